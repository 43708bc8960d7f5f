//! `ha-bench failover`: the drill across guest memory sizes. Detection, activation and
//! failover time against memory, as a table, a CSV (`failover.csv`) and a plot
//! (`failover.png`): what shows whether failover stays flat as guests grow.
//!
//! The sizes are taken in turn within each pass, and the passes repeat, so slow drift of a
//! shared host spreads over every size instead of landing on one.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::drill::{self, DrillArgs, DrillError};
use crate::plot::{self, PlotError};

/// Errors of the sweep.
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    /// A size that is not one.
    #[error("memory size {0:?}")]
    Size(String, #[source] ha_daemon::units::UnitError),
    /// No size to run.
    #[error("no memory size given")]
    NoSizes,
    /// A drill failed to run.
    #[error("drill at {memory}")]
    Drill {
        /// The size it ran.
        memory: String,
        /// Why.
        #[source]
        source: DrillError,
    },
    /// A result file cannot be written.
    #[error("cannot write {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The plot cannot be drawn.
    #[error(transparent)]
    Plot(#[from] PlotError),
}

/// The sweep: a drill as the template, the sizes, the passes.
#[derive(Debug, Clone)]
pub struct SweepArgs {
    /// Every drill's settings but its memory.
    pub drill: DrillArgs,
    /// Guest memory sizes, e.g. "256M", "1G", "4G".
    pub sizes: Vec<String>,
    /// Passes over the sizes.
    pub repeat: usize,
}

/// One drill of the sweep.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Point {
    /// The size as given.
    pub memory: String,
    /// The size in MiB.
    pub memory_mib: u64,
    /// The pass (1-based).
    pub pass: usize,
    /// Kill → declared lost.
    pub detection_ms: u64,
    /// Declared lost → guest resumed.
    pub activation_ms: u64,
    /// Kill → guest resumed.
    pub failover_ms: u64,
    /// The drill's continuity verdict.
    pub continuity_ok: bool,
}

/// Run every drill of the sweep; `each` sees every point as it comes.
pub fn run(a: &SweepArgs, mut each: impl FnMut(&Point)) -> Result<Vec<Point>, SweepError> {
    if a.sizes.is_empty() {
        return Err(SweepError::NoSizes);
    }
    let mib = a
        .sizes
        .iter()
        .map(|s| {
            ha_daemon::units::parse_size(s)
                .map(|b| b >> 20)
                .map_err(|e| SweepError::Size(s.clone(), e))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut points = Vec::new();
    for pass in 1..=a.repeat.max(1) {
        for (size, &memory_mib) in a.sizes.iter().zip(&mib) {
            let args = DrillArgs {
                memory: size.clone(),
                seed: a.drill.seed.wrapping_add(points.len() as u64),
                ..a.drill.clone()
            };
            let r = drill::run(&args).map_err(|source| SweepError::Drill {
                memory: size.clone(),
                source,
            })?;
            let p = Point {
                memory: size.clone(),
                memory_mib,
                pass,
                detection_ms: r.detection_ms,
                activation_ms: r.activation_ms,
                failover_ms: r.failover_ms,
                continuity_ok: r.continuity_ok,
            };
            each(&p);
            points.push(p);
        }
    }
    Ok(points)
}

/// The median of each figure per size, in the sizes' order: (size, MiB, detection,
/// activation, failover).
pub fn medians(points: &[Point]) -> Vec<(String, u64, u64, u64, u64)> {
    let mut sizes: Vec<(&str, u64)> = Vec::new();
    for p in points {
        if !sizes.iter().any(|(s, _)| *s == p.memory) {
            sizes.push((&p.memory, p.memory_mib));
        }
    }
    sizes
        .into_iter()
        .map(|(s, mib)| {
            let of = |f: fn(&Point) -> u64| {
                let mut v: Vec<u64> = points.iter().filter(|p| p.memory == s).map(f).collect();
                v.sort_unstable();
                v.get(v.len() / 2).copied().unwrap_or(0)
            };
            (
                s.to_string(),
                mib,
                of(|p| p.detection_ms),
                of(|p| p.activation_ms),
                of(|p| p.failover_ms),
            )
        })
        .collect()
}

/// Write `failover.csv` (every drill) and `failover.png` (medians against memory) into
/// `dir`; returns the files written.
pub fn write(points: &[Point], dir: &Path) -> Result<Vec<PathBuf>, SweepError> {
    let write_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SweepError::Write { path, source }
    };
    std::fs::create_dir_all(dir).map_err(write_err(dir))?;
    let csv = dir.join("failover.csv");
    let mut f = std::fs::File::create(&csv).map_err(write_err(&csv))?;
    writeln!(
        f,
        "memory,memory_mib,pass,detection_ms,activation_ms,failover_ms,continuity_ok"
    )
    .map_err(write_err(&csv))?;
    for p in points {
        writeln!(
            f,
            "{},{},{},{},{},{},{}",
            p.memory,
            p.memory_mib,
            p.pass,
            p.detection_ms,
            p.activation_ms,
            p.failover_ms,
            p.continuity_ok
        )
        .map_err(write_err(&csv))?;
    }
    let m = medians(points);
    let series = |name: &str, f: fn(&(String, u64, u64, u64, u64)) -> u64| {
        let pts = m.iter().map(|r| (r.1 as f64, f(r) as f64)).collect();
        (name.to_string(), pts)
    };
    let png = dir.join("failover.png");
    plot::lines(
        &png,
        "Failover against guest memory (medians)",
        ("guest memory (MiB)", "ms"),
        &[
            series("failover (kill → running)", |r| r.4),
            series("detection (kill → declared lost)", |r| r.2),
            series("activation (declared lost → running)", |r| r.3),
        ],
        true,
    )?;
    Ok(vec![csv, png])
}

/// The medians as a markdown table.
pub fn table(points: &[Point]) -> String {
    let mut s = String::from(
        "| memory | drills | detection ms | activation ms | failover ms | continuity |\n\
         |---|---|---|---|---|---|\n",
    );
    for (size, _, d, a, f) in medians(points) {
        let of: Vec<&Point> = points.iter().filter(|p| p.memory == size).collect();
        let ok = of.iter().all(|p| p.continuity_ok);
        s.push_str(&format!(
            "| {size} | {} | {d} | {a} | {f} | {} |\n",
            of.len(),
            if ok { "ok" } else { "FAILED" }
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(memory: &str, mib: u64, pass: usize, ms: (u64, u64, u64)) -> Point {
        Point {
            memory: memory.into(),
            memory_mib: mib,
            pass,
            detection_ms: ms.0,
            activation_ms: ms.1,
            failover_ms: ms.2,
            continuity_ok: true,
        }
    }

    #[test]
    fn medians_are_per_size_in_the_order_given() {
        let pts = [
            point("1G", 1024, 1, (9, 6, 15)),
            point("256M", 256, 1, (5, 2, 7)),
            point("1G", 1024, 2, (30, 8, 38)),
            point("256M", 256, 2, (4, 11, 15)),
            point("1G", 1024, 3, (10, 3, 13)),
        ];
        let m = medians(&pts);
        assert_eq!(m[0], ("1G".to_string(), 1024, 10, 6, 15));
        // Two drills: the upper of the two middle values.
        assert_eq!(m[1], ("256M".to_string(), 256, 5, 11, 15));
        let t = table(&pts);
        assert!(t.contains("| 1G | 3 | 10 | 6 | 15 | ok |"), "{t}");
    }
}
