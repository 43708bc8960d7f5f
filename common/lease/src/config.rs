//! Where the lease lives and how long it lasts: etcd's endpoints, the guest's key, the
//! holder's name, the TTL and the fencing margin, and TLS with client certificates.

use std::path::PathBuf;
use std::time::Duration;

/// Errors in a lease configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// No endpoint given.
    #[error("no etcd endpoint given")]
    NoEndpoint,
    /// An endpoint that is not a URL etcd's client takes.
    #[error("etcd endpoint {0:?} is not http(s)://host:port")]
    Endpoint(String),
    /// An empty key.
    #[error("the lease key is empty")]
    NoKey,
    /// A TTL etcd cannot grant.
    #[error("lease TTL {0:?} must be whole seconds, at least 2 s")]
    Ttl(Duration),
    /// A margin that leaves no time to hold the lease.
    #[error("fencing margin {margin:?} must be at most half the TTL {ttl:?}")]
    Margin {
        /// The margin.
        margin: Duration,
        /// The TTL.
        ttl: Duration,
    },
    /// TLS files given for a plain-http endpoint, or https without them.
    #[error(
        "etcd endpoint {0:?} and the TLS files disagree (https needs --etcd-ca/--etcd-cert/--etcd-key, http takes none)"
    )]
    TlsScheme(String),
    /// `--lease-key` (or TLS files) without `--etcd`.
    #[error("--{0} needs --etcd (where the lease is kept)")]
    WithoutEtcd(&'static str),
    /// `--etcd` without `--lease-key`.
    #[error("--etcd needs --lease-key (the guest's key, the same on both daemons)")]
    NoLeaseKey,
    /// Some of the TLS files but not all three.
    #[error("--etcd-ca, --etcd-cert and --etcd-key go together")]
    PartialTls,
}

/// The lease options both daemons take, as given on their command lines.
#[derive(Debug, Clone, Default)]
pub struct LeaseOptions<'a> {
    /// `--etcd`: client URLs, comma-separated.
    pub etcd: Option<&'a str>,
    /// `--lease-key`.
    pub key: Option<&'a str>,
    /// `--lease-ttl`.
    pub ttl: Duration,
    /// `--etcd-ca`.
    pub ca: Option<&'a std::path::Path>,
    /// `--etcd-cert`.
    pub cert: Option<&'a std::path::Path>,
    /// `--etcd-key`.
    pub tls_key: Option<&'a std::path::Path>,
}

impl LeaseOptions<'_> {
    /// The lease configuration the options describe (None without `--etcd`), held by
    /// `holder`, checked. The margin is a fifth of the TTL, at least 1 s.
    pub fn config(&self, holder: &str) -> Result<Option<LeaseConfig>, ConfigError> {
        let tls = match (self.ca, self.cert, self.tls_key) {
            (None, None, None) => None,
            (Some(ca), Some(cert), Some(key)) => Some(TlsFiles {
                ca: ca.to_owned(),
                cert: cert.to_owned(),
                key: key.to_owned(),
            }),
            _ => return Err(ConfigError::PartialTls),
        };
        let Some(etcd) = self.etcd else {
            if self.key.is_some() {
                return Err(ConfigError::WithoutEtcd("lease-key"));
            }
            if tls.is_some() {
                return Err(ConfigError::WithoutEtcd("etcd-ca"));
            }
            return Ok(None);
        };
        let key = self.key.ok_or(ConfigError::NoLeaseKey)?;
        let endpoints = etcd
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(str::to_owned)
            .collect();
        let cfg = LeaseConfig {
            endpoints,
            key: key.to_owned(),
            holder: holder.to_owned(),
            ttl: self.ttl,
            margin: (self.ttl / 5).max(Duration::from_secs(1)),
            tls,
        };
        cfg.validate()?;
        Ok(Some(cfg))
    }
}

/// The client's TLS files (etcd's own PEM files: the CA that signed the members'
/// certificates, and this client's certificate and key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The CA certificate.
    pub ca: PathBuf,
    /// This client's certificate.
    pub cert: PathBuf,
    /// This client's private key.
    pub key: PathBuf,
}

/// One guest's lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseConfig {
    /// etcd's client URLs (`http://host:port` or `https://…`); any member will do.
    pub endpoints: Vec<String>,
    /// The guest's key, e.g. `/castor/guests/web1`.
    pub key: String,
    /// Who holds it (stored as the key's value, shown to whoever finds it taken).
    pub holder: String,
    /// The lease's time to live (whole seconds, at least 2).
    pub ttl: Duration,
    /// How long before the lease could expire in etcd the holder stops trusting it: time
    /// to stop the guest and hold its output, plus clock-rate slack.
    pub margin: Duration,
    /// TLS with client certificates, for `https` endpoints.
    pub tls: Option<TlsFiles>,
}

impl LeaseConfig {
    /// A plain-http configuration with the default TTL (5 s) and margin (1 s).
    pub fn new(endpoints: Vec<String>, key: &str, holder: &str) -> Self {
        Self {
            endpoints,
            key: key.to_owned(),
            holder: holder.to_owned(),
            ttl: Duration::from_secs(5),
            margin: Duration::from_secs(1),
            tls: None,
        }
    }

    /// Check the configuration before anything connects.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.endpoints.is_empty() {
            return Err(ConfigError::NoEndpoint);
        }
        for e in &self.endpoints {
            let rest = e
                .strip_prefix("http://")
                .or_else(|| e.strip_prefix("https://"))
                .ok_or_else(|| ConfigError::Endpoint(e.clone()))?;
            let port_ok = rest
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
            if !port_ok {
                return Err(ConfigError::Endpoint(e.clone()));
            }
            if e.starts_with("https://") != self.tls.is_some() {
                return Err(ConfigError::TlsScheme(e.clone()));
            }
        }
        if self.key.is_empty() {
            return Err(ConfigError::NoKey);
        }
        if self.ttl.subsec_nanos() != 0 || self.ttl < Duration::from_secs(2) {
            return Err(ConfigError::Ttl(self.ttl));
        }
        if self.margin * 2 > self.ttl {
            return Err(ConfigError::Margin {
                margin: self.margin,
                ttl: self.ttl,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_make_a_checked_configuration() {
        let o = LeaseOptions {
            etcd: Some("http://10.0.0.1:2379, http://10.0.0.2:2379"),
            key: Some("/castor/guests/web1"),
            ttl: Duration::from_secs(10),
            ..LeaseOptions::default()
        };
        let c = o.config("primary on p1").unwrap().unwrap();
        assert_eq!(c.endpoints.len(), 2);
        assert_eq!(c.margin, Duration::from_secs(2));
        assert_eq!(c.holder, "primary on p1");
        let none = LeaseOptions {
            ttl: Duration::from_secs(5),
            ..LeaseOptions::default()
        };
        assert_eq!(none.config("x").unwrap(), None);
        let msg = |o: LeaseOptions<'_>| o.config("x").unwrap_err().to_string();
        assert!(
            msg(LeaseOptions {
                key: Some("/k"),
                ..none.clone()
            })
            .contains("--lease-key needs --etcd")
        );
        assert!(
            msg(LeaseOptions {
                etcd: Some("http://h:1"),
                ..none.clone()
            })
            .contains("--lease-key")
        );
        let ca = std::path::Path::new("/ca.pem");
        assert!(
            msg(LeaseOptions {
                ca: Some(ca),
                ..o.clone()
            })
            .contains("go together")
        );
        assert!(
            msg(LeaseOptions {
                ttl: Duration::from_secs(1),
                ..o.clone()
            })
            .contains("at least 2")
        );
    }

    #[test]
    fn bad_configurations_are_named() {
        let ok = LeaseConfig::new(vec!["http://127.0.0.1:2379".into()], "/k", "me");
        ok.validate().unwrap();
        let with = |f: &dyn Fn(&mut LeaseConfig)| {
            let mut c = ok.clone();
            f(&mut c);
            c.validate().unwrap_err().to_string()
        };
        assert!(with(&|c| c.endpoints.clear()).contains("no etcd endpoint"));
        assert!(with(&|c| c.endpoints = vec!["127.0.0.1:2379".into()]).contains("127.0.0.1:2379"));
        assert!(with(&|c| c.endpoints = vec!["http://host".into()]).contains("http://host"));
        assert!(with(&|c| c.key.clear()).contains("key is empty"));
        assert!(with(&|c| c.ttl = Duration::from_millis(2500)).contains("whole seconds"));
        assert!(with(&|c| c.ttl = Duration::from_secs(1)).contains("at least 2"));
        assert!(with(&|c| c.margin = Duration::from_secs(3)).contains("at most half the TTL"));
        assert!(with(&|c| c.endpoints = vec!["https://h:1".into()]).contains("TLS files"));
    }
}
