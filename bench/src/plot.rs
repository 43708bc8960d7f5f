//! PNG plots of `ha-bench compare` results (plotters, bitmap backend): pause time by mode
//! and workload, wire bytes by mode, overhead against the epoch interval, and wire bytes
//! against the fgbi block size.
//!
//! Text is drawn with a TrueType font read from the system (DejaVu Sans, Debian's
//! `fonts-dejavu-core`; `CASTOR_PLOT_FONT` names another file).

use crate::compare::RunResult;
use plotters::prelude::*;
use std::path::{Path, PathBuf};

/// Errors drawing a plot.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// No usable font file.
    #[error(
        "no font for the plots at {0} (install fonts-dejavu-core, or set CASTOR_PLOT_FONT to a .ttf file)"
    )]
    Font(PathBuf),
    /// plotters failed.
    #[error("drawing {file}: {why}")]
    Draw {
        /// The PNG.
        file: PathBuf,
        /// plotters' message.
        why: String,
    },
}

const MODES: [&str; 3] = ["remus", "xbzrle", "fgbi"];
const COLORS: [RGBColor; 4] = [
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0x94, 0x67, 0xbd),
];

/// Register the font once; the error names the file tried.
fn font() -> Result<(), PlotError> {
    static DONE: std::sync::OnceLock<Result<(), PathBuf>> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        let path = PathBuf::from(
            std::env::var("CASTOR_PLOT_FONT")
                .unwrap_or_else(|_| "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf".to_string()),
        );
        let bytes = std::fs::read(&path).map_err(|_| path.clone())?;
        // plotters keeps the font for the life of the process.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| path.clone())
    })
    .clone()
    .map_err(PlotError::Font)
}

fn draw_err(file: &Path) -> impl Fn(String) -> PlotError + '_ {
    move |why| PlotError::Draw {
        file: file.to_path_buf(),
        why,
    }
}

/// The default-block, first-link, first-interval protected result for (workload, mode).
fn pick<'a>(rs: &'a [RunResult], w: &str, m: &str) -> Option<&'a RunResult> {
    let first = rs.iter().find(|r| r.mode != "none")?;
    rs.iter().find(|r| {
        r.workload == w
            && r.mode == m
            && (r.block_size == 64 || r.block_size == 0)
            && r.link == first.link
            && r.interval_ms == first.interval_ms
    })
}

fn workloads(rs: &[RunResult]) -> Vec<String> {
    let mut v: Vec<String> = Vec::new();
    for r in rs {
        if !v.contains(&r.workload) {
            v.push(r.workload.clone());
        }
    }
    v
}

/// Grouped bars: one group per workload, one bar per mode, `value` of each; log scale
/// when `log`. A thin dark bar on top shows `whisker` (e.g. p99) when given.
#[allow(clippy::too_many_arguments)]
fn grouped_bars(
    rs: &[RunResult],
    file: &Path,
    title: &str,
    ylabel: &str,
    value: impl Fn(&RunResult) -> f64,
    whisker: Option<&dyn Fn(&RunResult) -> f64>,
    log: bool,
) -> Result<(), PlotError> {
    font()?;
    let e = draw_err(file);
    let ws = workloads(rs);
    let mut ymax: f64 = 0.0;
    let mut ymin = f64::MAX;
    for w in &ws {
        for m in MODES {
            if let Some(r) = pick(rs, w, m) {
                let v = whisker.map_or(value(r), |f| f(r).max(value(r)));
                ymax = ymax.max(v);
                if value(r) > 0.0 {
                    ymin = ymin.min(value(r));
                }
            }
        }
    }
    if ymax <= 0.0 {
        return Ok(());
    }
    let root = BitMapBackend::new(file, (900, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
    let n = ws.len() as f64;
    let bar = 0.8 / MODES.len() as f64;
    let x_label = |x: &f64| {
        // Labels sit at the middle of each group: x = i + 0.5.
        ws.iter()
            .enumerate()
            .find(|(i, _)| (x - (*i as f64 + 0.5)).abs() < 1e-6)
            .map(|(_, w)| w.clone())
            .unwrap_or_default()
    };
    macro_rules! body {
        ($chart:expr, $base:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .disable_x_mesh()
                .x_labels(ws.len() * 2 + 1)
                .x_label_formatter(&x_label)
                .y_desc(ylabel)
                .draw()
                .map_err(|x| e(x.to_string()))?;
            for (mi, m) in MODES.iter().enumerate() {
                let color = COLORS[mi];
                let mut bars = Vec::new();
                let mut ticks = Vec::new();
                for (wi, w) in ws.iter().enumerate() {
                    let Some(r) = pick(rs, w, m) else { continue };
                    let x0 = wi as f64 + 0.1 + mi as f64 * bar;
                    let v = value(r).max($base);
                    bars.push(Rectangle::new(
                        [(x0, $base), (x0 + bar * 0.9, v)],
                        color.filled(),
                    ));
                    if let Some(f) = whisker {
                        let p = f(r).max($base);
                        let xm = x0 + bar * 0.45;
                        ticks.push(PathElement::new(
                            vec![(xm, v), (xm, p)],
                            BLACK.stroke_width(2),
                        ));
                        ticks.push(PathElement::new(
                            vec![(xm - bar * 0.2, p), (xm + bar * 0.2, p)],
                            BLACK.stroke_width(2),
                        ));
                    }
                }
                chart
                    .draw_series(bars)
                    .map_err(|x| e(x.to_string()))?
                    .label(*m)
                    .legend(move |(x, y)| {
                        Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled())
                    });
                chart.draw_series(ticks).map_err(|x| e(x.to_string()))?;
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .position(SeriesLabelPosition::UpperRight)
                .draw()
                .map_err(|x| e(x.to_string()))?;
        }};
    }
    let mut cb = ChartBuilder::on(&root);
    cb.caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(70);
    if log {
        let base = (ymin / 2.0).max(1e-3);
        let chart = cb
            .build_cartesian_2d(0f64..n, (base..ymax * 3.0).log_scale())
            .map_err(|x| e(x.to_string()))?;
        body!(chart, base);
    } else {
        let chart = cb
            .build_cartesian_2d(0f64..n, 0f64..ymax * 1.15)
            .map_err(|x| e(x.to_string()))?;
        body!(chart, 0.0);
    }
    root.present().map_err(|x| e(x.to_string()))?;
    Ok(())
}

/// Lines: x against y, one series per key (a workload and mode, or a figure).
pub(crate) fn lines(
    file: &Path,
    title: &str,
    (xlabel, ylabel): (&str, &str),
    series: &[(String, Vec<(f64, f64)>)],
    log_x: bool,
) -> Result<(), PlotError> {
    font()?;
    let e = draw_err(file);
    let pts = series.iter().flat_map(|s| s.1.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    if x0 > x1 {
        return Ok(());
    }
    let pad = ((y1 - y0) * 0.1).max(1.0);
    let (y0, y1) = (y0.min(0.0) - pad * 0.2, y1 + pad);
    let root = BitMapBackend::new(file, (900, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
    let mut cb = ChartBuilder::on(&root);
    cb.caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70);
    macro_rules! body {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_desc(xlabel)
                .y_desc(ylabel)
                .x_label_formatter(&|x| format!("{x:.0}"))
                .draw()
                .map_err(|x| e(x.to_string()))?;
            for (i, (name, v)) in series.iter().enumerate() {
                let color = Palette99::pick(i).to_rgba();
                chart
                    .draw_series(LineSeries::new(v.iter().copied(), color.stroke_width(2)))
                    .map_err(|x| e(x.to_string()))?
                    .label(name.as_str())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
                    });
                chart
                    .draw_series(v.iter().map(|&p| Circle::new(p, 3, color.filled())))
                    .map_err(|x| e(x.to_string()))?;
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .position(SeriesLabelPosition::UpperLeft)
                .draw()
                .map_err(|x| e(x.to_string()))?;
        }};
    }
    if log_x {
        // Label exactly the x values measured (block sizes, intervals).
        let mut keys: Vec<f64> = series
            .iter()
            .flat_map(|s| s.1.iter().map(|p| p.0))
            .collect();
        keys.sort_by(f64::total_cmp);
        keys.dedup();
        let chart = cb
            .build_cartesian_2d(
                (x0 * 0.8..x1 * 1.25).log_scale().with_key_points(keys),
                y0..y1,
            )
            .map_err(|x| e(x.to_string()))?;
        body!(chart);
    } else {
        let chart = cb
            .build_cartesian_2d(x0 * 0.9..x1 * 1.05, y0..y1)
            .map_err(|x| e(x.to_string()))?;
        body!(chart);
    }
    root.present().map_err(|x| e(x.to_string()))?;
    Ok(())
}

/// Write every plot the results allow into `dir`; returns the files written.
pub fn all(rs: &[RunResult], dir: &Path) -> Result<Vec<PathBuf>, PlotError> {
    let mut files = Vec::new();
    let protected = rs.iter().any(|r| r.mode != "none");
    if protected {
        let at = rs
            .iter()
            .find(|r| r.mode != "none")
            .map(|r| format!("{:.0} ms, link {}", r.interval_ms, r.link))
            .unwrap_or_default();
        let f = dir.join("pause.png");
        grouped_bars(
            rs,
            &f,
            &format!("Pause per checkpoint, p50 (bar) and p99 (whisker); {at}"),
            "ms",
            |r| r.pause_ms_p50,
            Some(&|r: &RunResult| r.pause_ms_p99),
            false,
        )?;
        files.push(f);
        let f = dir.join("wire.png");
        grouped_bars(
            rs,
            &f,
            &format!("Wire bytes per checkpoint (log scale); {at}"),
            "KB per checkpoint",
            |r| r.wire_bytes_per_epoch / 1e3,
            None,
            true,
        )?;
        files.push(f);
    }
    // Overhead against interval, when more than one interval was run.
    let mut intervals: Vec<f64> = rs
        .iter()
        .filter(|r| r.mode != "none")
        .map(|r| r.interval_ms)
        .collect();
    intervals.sort_by(f64::total_cmp);
    intervals.dedup();
    if intervals.len() > 1 {
        let link = rs.iter().find(|r| r.mode != "none").map(|r| r.link.clone());
        let mut series = Vec::new();
        for w in workloads(rs) {
            for m in MODES {
                let v: Vec<(f64, f64)> = rs
                    .iter()
                    .filter(|r| {
                        r.workload == w
                            && r.mode == m
                            && Some(&r.link) == link.as_ref()
                            && (r.block_size == 64 || r.block_size == 0)
                    })
                    .filter_map(|r| Some((r.interval_ms, r.overhead_pct?)))
                    .collect();
                if !v.is_empty() {
                    series.push((format!("{w} {m}"), v));
                }
            }
        }
        let f = dir.join("overhead.png");
        lines(
            &f,
            "Guest overhead against the epoch interval",
            ("epoch interval (ms)", "progress lost vs unprotected (%)"),
            &series,
            true,
        )?;
        files.push(f);
    }
    // Wire bytes against fgbi block size, when swept.
    let mut series = Vec::new();
    for w in workloads(rs) {
        let mut v: Vec<(f64, f64)> = rs
            .iter()
            .filter(|r| r.workload == w && r.mode == "fgbi")
            .map(|r| (f64::from(r.block_size), r.wire_bytes_per_epoch / 1e3))
            .collect();
        v.sort_by(|a, b| a.0.total_cmp(&b.0));
        v.dedup_by(|a, b| a.0 == b.0);
        if v.len() > 1 {
            series.push((w, v));
        }
    }
    if !series.is_empty() {
        let f = dir.join("blocksize.png");
        lines(
            &f,
            "fgbi wire bytes per checkpoint against block size",
            ("block size (bytes)", "KB per checkpoint"),
            &series,
            true,
        )?;
        files.push(f);
    }
    Ok(files)
}
