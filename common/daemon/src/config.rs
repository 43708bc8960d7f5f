//! The daemons' options: a clap command line with a `--config` TOML file merged under it.
//! A flag given on the command line beats the file; the file beats the built-in defaults.
//!
//! A daemon's option struct implements [`Options`] (its file struct, and how each file
//! value becomes an option's value); [`load`] parses the command line, reads the file and
//! merges it. Unknown keys are refused by the file struct (`#[serde(deny_unknown_fields)]`),
//! and a refused value names the file and the key ([`LoadError::Value`]). The [`overlay!`]
//! macro sets every option the command line did not give from the file, through one
//! conversion per key; the conversions both daemons use are here ([`size`], [`duration`],
//! [`parsed`], [`rule`], [`same`], [`some`]).
//!
//! [`overlay!`]: crate::overlay

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches};
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::limits::LimitError;
use crate::units::{UnitError, parse_duration, parse_rate, parse_size};

/// The id of the option naming the config file.
pub const CONFIG: &str = "config";

/// Errors loading the options.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The command line does not parse (this includes `--help` and `--version`).
    #[error(transparent)]
    Clap(#[from] clap::Error),
    /// The config file cannot be read.
    #[error("cannot read the config file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid TOML, has an unknown key, or a value of the wrong type.
    #[error("config file {path}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why (names the key).
        #[source]
        source: Box<toml::de::Error>,
    },
    /// A value in the config file is refused.
    #[error("config file {path}: {key}: {problem}")]
    Value {
        /// The file.
        path: PathBuf,
        /// The key.
        key: &'static str,
        /// Why.
        problem: String,
    },
}

/// A daemon's command line, which the file its `--config FILE` option (an
/// `Option<PathBuf>` named `config`) names can fill in.
pub trait Options: CommandFactory + FromArgMatches {
    /// The config file: every option but `config`, all optional, unknown keys refused.
    type File: DeserializeOwned;

    /// Take the values of `file` that `overlay` lets through (usually with [`overlay!`]).
    ///
    /// [`overlay!`]: crate::overlay
    fn merge(&mut self, file: Self::File, overlay: &Overlay<'_>) -> Result<(), LoadError>;
}

/// Parse the command line `args`, then merge the `--config` file under it.
pub fn load<O, I, T>(args: I) -> Result<O, LoadError>
where
    O: Options,
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let matches = O::command().try_get_matches_from(args)?;
    let mut opts = O::from_arg_matches(&matches)?;
    if let Some(path) = matches.get_one::<PathBuf>(CONFIG) {
        let overlay = Overlay {
            matches: &matches,
            path,
        };
        opts.merge(read(path)?, &overlay)?;
    }
    Ok(opts)
}

/// The ids of `cmd`'s options that a config file can set (every option but `config`,
/// `help` and `version`; the file's keys are these ids), sorted.
pub fn file_keys(cmd: &clap::Command) -> Vec<&str> {
    let mut ids: Vec<&str> = cmd
        .get_arguments()
        .map(|a| a.get_id().as_str())
        .filter(|id| !matches!(*id, CONFIG | "help" | "version"))
        .collect();
    ids.sort_unstable();
    ids
}

/// Read and parse the TOML file `path`; unknown keys and ill-typed values are refused.
pub fn read<F: DeserializeOwned>(path: &Path) -> Result<F, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|source| LoadError::Parse {
        path: path.to_path_buf(),
        source: Box::new(source),
    })
}

/// Which options the file may set: those the command line did not give.
#[derive(Debug, Clone, Copy)]
pub struct Overlay<'a> {
    matches: &'a ArgMatches,
    path: &'a Path,
}

impl Overlay<'_> {
    /// Set `slot` (the option `key`) from the file's `value` through `conv`, unless the
    /// command line gave the option; a value `conv` refuses is an error naming file and key.
    pub fn set<V, T>(
        &self,
        key: &'static str,
        value: Option<V>,
        slot: &mut T,
        conv: impl FnOnce(V) -> Result<T, String>,
    ) -> Result<(), LoadError> {
        if let Some(v) = value
            && self.matches.value_source(key) != Some(ValueSource::CommandLine)
        {
            *slot = conv(v).map_err(|problem| LoadError::Value {
                path: self.path.to_path_buf(),
                key,
                problem,
            })?;
        }
        Ok(())
    }
}

/// In [`Options::merge`]: `overlay!(overlay, opts, file; key: conversion, …)` sets
/// `opts.key` from `file.key` through `conversion` (`FnOnce(file value) -> Result<option
/// value, String>`) for every key the command line did not give (see [`Overlay::set`]).
#[macro_export]
macro_rules! overlay {
    ($overlay:expr, $opts:expr, $file:expr; $($key:ident: $conv:expr),* $(,)?) => {$(
        $overlay.set(stringify!($key), $file.$key, &mut $opts.$key, $conv)?;
    )*};
}

/// A size in the config file: bytes (`memory = 268435456`) or text (`memory = "256M"`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum Size {
    /// Bytes.
    Bytes(u64),
    /// A size with a unit suffix ([`parse_size`]).
    Text(String),
}

impl Size {
    /// The size in bytes.
    pub fn bytes(&self) -> Result<u64, UnitError> {
        match self {
            Self::Bytes(n) => Ok(*n),
            Self::Text(s) => parse_size(s),
        }
    }
}

/// An option's value as the command line gave it (text, parsed when the options are
/// checked) or as the config file gave it (parsed and checked when the file was merged):
/// either way each value is parsed once, and a refused one is named as it was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Given<T> {
    /// The command line's text (or the default's).
    Text(String),
    /// The config file's value, parsed and checked.
    Parsed(T),
}

impl<T: Clone> Given<T> {
    /// The clap value parser: the text as it is.
    pub fn text(s: &str) -> Result<Self, std::convert::Infallible> {
        Ok(Self::Text(s.to_owned()))
    }

    /// The value: the file's as it is, the command line's through `parse` (which checks).
    pub fn resolve<E>(&self, parse: impl FnOnce(&str) -> Result<T, E>) -> Result<T, E> {
        match self {
            Self::Text(s) => parse(s),
            Self::Parsed(v) => Ok(v.clone()),
        }
    }
}

/// The file's value as it is.
pub fn same<T>(v: T) -> Result<T, String> {
    Ok(v)
}

/// The file's value for an optional option.
pub fn some<T>(v: T) -> Result<Option<T>, String> {
    Ok(Some(v))
}

/// A size, in bytes.
pub fn size(v: Size) -> Result<u64, String> {
    v.bytes().map_err(|e| e.to_string())
}

/// A duration ([`parse_duration`]).
pub fn duration(v: String) -> Result<Duration, String> {
    parse_duration(&v).map_err(|e| e.to_string())
}

/// A link rate in bits per second ([`parse_rate`]).
pub fn rate(v: String) -> Result<u64, String> {
    parse_rate(&v).map_err(|e| e.to_string())
}

/// A value through [`FromStr`](std::str::FromStr).
pub fn parsed<T: std::str::FromStr<Err: std::fmt::Display>>(v: String) -> Result<T, String> {
    v.parse().map_err(|e: T::Err| e.to_string())
}

/// A value through its option's bounds ([`crate::limits`]); the problem without the
/// option, which the key names.
pub fn rule<T>(r: Result<T, LimitError>) -> Result<T, String> {
    r.map_err(|e| e.rule())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::check_interval;

    /// A daemon's options in small.
    #[derive(Debug, clap::Parser)]
    struct Opts {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long, default_value = "25ms", value_parser = parse_duration)]
        interval: Duration,
        #[arg(long, default_value = "1M", value_parser = Given::<u64>::text)]
        memory: Given<u64>,
        #[arg(long)]
        name: Option<String>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct File {
        interval: Option<String>,
        memory: Option<Size>,
        name: Option<String>,
    }

    impl Options for Opts {
        type File = File;
        fn merge(&mut self, file: File, o: &Overlay<'_>) -> Result<(), LoadError> {
            crate::overlay!(o, self, file;
                interval: |v| rule(check_interval(duration(v)?)),
                memory: |v| size(v).map(Given::Parsed),
                name: some,
            );
            Ok(())
        }
    }

    /// `opts --config FILE ARGS` with `text` in FILE.
    fn with_file(name: &str, text: &str, args: &[&str]) -> Result<Opts, LoadError> {
        let file =
            std::env::temp_dir().join(format!("castor-config-{}-{name}", std::process::id()));
        std::fs::write(&file, text).expect("write the config file");
        let head = ["opts".into(), "--config".into(), file.into_os_string()];
        load(head.into_iter().chain(args.iter().map(OsString::from)))
    }

    #[test]
    fn the_file_fills_in_and_the_command_line_wins() {
        let o = with_file(
            "fill.toml",
            "interval = \"10ms\"\nmemory = \"2M\"\nname = \"a\"\n",
            &["--name", "b"],
        )
        .expect("valid");
        assert_eq!(o.interval, Duration::from_millis(10));
        assert_eq!(o.memory, Given::Parsed(2 << 20));
        assert_eq!(o.name.as_deref(), Some("b"));
        assert_eq!(file_keys(&Opts::command()), ["interval", "memory", "name"]);
        let o: Opts = load(["opts"]).expect("defaults");
        assert_eq!(o.memory, Given::Text("1M".into()));
        assert_eq!(o.memory.resolve(parse_size), Ok(1 << 20));
    }

    #[test]
    fn refusals_name_the_file_and_the_key() {
        for (name, text, says) in [
            (
                "unknown.toml",
                "intervall = 3\n",
                "unknown field `intervall`",
            ),
            (
                "zero.toml",
                "interval = \"0\"\n",
                "zero.toml: interval: 0ns is below the minimum of 1ms",
            ),
            (
                "size.toml",
                "memory = \"12q\"\n",
                "size.toml: memory: \"12q\" is not a size (examples: 4096, 64k, 256M, 1G)",
            ),
        ] {
            let msg = crate::error_chain(&with_file(name, text, &[]).expect_err(text));
            assert!(
                msg.starts_with("config file ") && msg.contains(name),
                "{msg}"
            );
            assert!(msg.contains(says), "{msg}");
        }
        let e =
            load::<Opts, _, _>(["opts", "--config", "/nonexistent/c.toml"]).expect_err("no file");
        assert!(
            e.to_string().starts_with("cannot read the config file"),
            "{e}"
        );
    }
}
