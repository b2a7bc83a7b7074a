//! The job timeline plot: one row per function, its phases as coloured bars
//! on a shared wall-clock axis (seconds since the earliest phase start).
//! Hand-written SVG: a few rectangles and labels do not need a plotting crate.

use std::fmt::Write as _;
use std::io;
use std::path::Path;

pub use particle_workloads::timeline::Phase;

/// The phase before a function runs: the launcher waiting for (or building)
/// its network, from the job's submission to the function's start.
pub const NETWORK: &str = "network";

/// One function's row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub label: String,
    pub phases: Vec<Phase>,
}

impl Row {
    /// A function's row from its output (`phase=` lines), with a `network`
    /// phase from `submitted_ns` to its `started_ns` line when both are known.
    pub fn from_output(label: impl Into<String>, stdout: &str, submitted_ns: Option<u128>) -> Self {
        let mut phases = Vec::new();
        let started =
            particle_workloads::ring::parse_probe(stdout, particle_workloads::ring::STARTED);
        if let (Some(s), Some(t)) = (submitted_ns, started) {
            if t >= s {
                phases.push(Phase {
                    name: NETWORK.into(),
                    start_ns: s,
                    end_ns: t,
                });
            }
        }
        phases.extend(particle_workloads::timeline::parse_phases(stdout));
        Self {
            label: label.into(),
            phases,
        }
    }
}

/// Known phases in legend order, with their colours.
const PALETTE: &[(&str, &str)] = &[
    (NETWORK, "#9e9e9e"),
    ("source", "#8bc34a"),
    ("exchange", "#ff9800"),
    ("encode", "#3f51b5"),
    ("collect", "#e91e63"),
];
const OTHER: &str = "#607d8b";

fn colour(name: &str) -> &'static str {
    PALETTE
        .iter()
        .find(|(n, _)| *n == name)
        .map_or(OTHER, |(_, c)| c)
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Renders the plot. Rows get thinner as there are more of them (a burst of
/// hundreds of functions still fits one screen); labels show while legible.
pub fn render_svg(title: &str, rows: &[Row]) -> String {
    let t0 = rows
        .iter()
        .flat_map(|r| &r.phases)
        .map(|p| p.start_ns)
        .min()
        .unwrap_or(0);
    let t1 = rows
        .iter()
        .flat_map(|r| &r.phases)
        .map(|p| p.end_ns)
        .max()
        .unwrap_or(t0)
        .max(t0 + 1);
    let span_s = (t1 - t0) as f64 / 1e9;

    let row_h = (640.0 / rows.len().max(1) as f64).clamp(2.0, 18.0);
    let labels = row_h >= 9.0;
    let left = if labels { 90.0 } else { 20.0 };
    let plot_w = 900.0;
    let top = 50.0;
    let plot_h = row_h * rows.len() as f64;
    let width = left + plot_w + 20.0;
    let height = top + plot_h + 70.0;
    let x = |ns: u128| left + (ns.saturating_sub(t0)) as f64 / 1e9 / span_s * plot_w;

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{left}" y="20" font-size="14">{}</text>"#,
        escape(title)
    );
    for (i, row) in rows.iter().enumerate() {
        let y = top + i as f64 * row_h;
        if labels {
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
                left - 4.0,
                y + row_h * 0.75,
                escape(&row.label)
            );
        }
        for p in &row.phases {
            let (x0, x1) = (x(p.start_ns), x(p.end_ns.max(p.start_ns)));
            let _ = writeln!(
                s,
                r#"<rect x="{x0:.2}" y="{:.2}" width="{:.2}" height="{:.2}" fill="{}"><title>{} {}: {:.3} s</title></rect>"#,
                y + row_h * 0.1,
                (x1 - x0).max(0.5),
                row_h * 0.8,
                colour(&p.name),
                escape(&row.label),
                escape(&p.name),
                (p.end_ns.saturating_sub(p.start_ns)) as f64 / 1e9
            );
        }
    }

    // Time axis: about eight ticks at a round step.
    let axis_y = top + plot_h + 4.0;
    let _ = writeln!(
        s,
        r#"<line x1="{left}" y1="{axis_y:.1}" x2="{:.1}" y2="{axis_y:.1}" stroke="black"/>"#,
        left + plot_w
    );
    let step = nice_step(span_s / 8.0);
    let mut t = 0.0;
    while t <= span_s + 1e-9 {
        let tx = left + t / span_s * plot_w;
        let _ = writeln!(
            s,
            r#"<line x1="{tx:.1}" y1="{axis_y:.1}" x2="{tx:.1}" y2="{:.1}" stroke="black"/><text x="{tx:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            axis_y + 4.0,
            axis_y + 16.0,
            trim(t)
        );
        t += step;
    }
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">seconds since the job started</text>"#,
        left + plot_w / 2.0,
        axis_y + 32.0
    );

    // Legend: the phases that occur, in the palette's order, then others.
    let mut names: Vec<&str> = PALETTE
        .iter()
        .map(|(n, _)| *n)
        .filter(|n| rows.iter().flat_map(|r| &r.phases).any(|p| p.name == *n))
        .collect();
    for p in rows.iter().flat_map(|r| &r.phases) {
        if !names.contains(&p.name.as_str()) {
            names.push(&p.name);
        }
    }
    let mut lx = left + 300.0;
    for n in names {
        let _ = writeln!(
            s,
            r#"<rect x="{lx:.1}" y="30" width="10" height="10" fill="{}"/><text x="{:.1}" y="39">{}</text>"#,
            colour(n),
            lx + 14.0,
            escape(n)
        );
        lx += 20.0 + 7.0 * n.len() as f64;
    }
    s.push_str("</svg>\n");
    s
}

/// 1, 2 or 5 times a power of ten, at least `raw`.
fn nice_step(raw: f64) -> f64 {
    if raw <= 0.0 || !raw.is_finite() {
        return 1.0;
    }
    let mag = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag)
}

fn trim(t: f64) -> String {
    let s = format!("{t:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

pub fn write_svg(path: &Path, title: &str, rows: &[Row]) -> io::Result<()> {
    std::fs::write(path, render_svg(title, rows))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_come_from_function_output_and_render() {
        let out = "started_ns=1500000000\nphase=encode start_ns=1600000000 end_ns=2500000000\n";
        let row = Row::from_output("f0 <n0>", out, Some(1_000_000_000));
        assert_eq!(row.phases.len(), 2);
        assert_eq!(row.phases[0].name, NETWORK);
        assert_eq!(
            (row.phases[0].start_ns, row.phases[0].end_ns),
            (1_000_000_000, 1_500_000_000)
        );
        let other = Row {
            label: "f1".into(),
            phases: vec![Phase {
                name: "custom".into(),
                start_ns: 1_000_000_000,
                end_ns: 1_200_000_000,
            }],
        };
        let svg = render_svg("job & test", &[row, other]);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert!(svg.contains("job &amp; test") && svg.contains("f0 &lt;n0&gt;"));
        // 1 background + 3 phases + 3 legend entries.
        assert_eq!(svg.matches("<rect").count(), 7);
        assert!(svg.contains(colour("encode")) && svg.contains(OTHER));
        // Ticks every 0.2 s over 1.5 s.
        assert!(svg.contains(">1.4</text>"), "{svg}");
    }

    #[test]
    fn steps_are_round() {
        assert_eq!(nice_step(0.13), 0.2);
        assert_eq!(nice_step(3.0), 5.0);
        assert_eq!(nice_step(0.0), 1.0);
    }

    #[test]
    fn an_empty_plot_still_renders() {
        let svg = render_svg("nothing", &[]);
        assert!(svg.contains("</svg>"));
    }
}
