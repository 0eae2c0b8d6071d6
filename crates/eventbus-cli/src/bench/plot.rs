//! `--plot FILE.svg`: grouped bar charts of throughput and latency per level
//! and backend. Plain SVG text, so no font or drawing library is needed.

use std::fmt::Write as _;

use super::LevelReport;

const PANEL_W: f64 = 900.0;
const PANEL_H: f64 = 260.0;
const COLORS: [&str; 6] = ["#4e79a7", "#a0cbe8", "#f28e2b", "#ffbe7d", "#59a14f", "#8cd17d"];

/// One chart: a value per (level, label).
struct Panel<'a> {
    title: &'a str,
    value: fn(&LevelReport) -> f64,
}

/// The SVG document for `reports`.
/// The short levels and the sustained level's first run are drawn (the
/// sustained level's spread is in the tables).
pub(crate) fn svg(reports: &[LevelReport]) -> String {
    let drawn: Vec<LevelReport> = reports.iter().filter(|r| r.run <= 1).cloned().collect();
    let reports = &drawn[..];
    let panels = [
        Panel {
            title: "throughput (events/s, first send to last receive)",
            value: LevelReport::throughput,
        },
        Panel {
            title: "publish call p99 (ms)",
            value: |r| r.publish_us.value_at_quantile(0.99) as f64 / 1000.0,
        },
        Panel {
            title: "end-to-end p99 (ms)",
            value: |r| r.end_to_end_us.value_at_quantile(0.99) as f64 / 1000.0,
        },
    ];
    let mut labels: Vec<&str> = Vec::new();
    let mut levels: Vec<usize> = Vec::new();
    for r in reports {
        if !labels.contains(&r.label.as_str()) {
            labels.push(&r.label);
        }
        if !levels.contains(&r.events) {
            levels.push(r.events);
        }
    }
    let height = PANEL_H * panels.len() as f64 + 60.0;
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{PANEL_W}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    for (i, label) in labels.iter().enumerate() {
        let x = 60.0 + i as f64 * 130.0;
        let _ = writeln!(
            out,
            "<rect x=\"{x}\" y=\"10\" width=\"12\" height=\"12\" fill=\"{}\"/><text x=\"{}\" y=\"20\">{label}</text>",
            COLORS[i % COLORS.len()],
            x + 16.0
        );
    }
    for (p, panel) in panels.iter().enumerate() {
        draw_panel(
            &mut out,
            panel,
            reports,
            &labels,
            &levels,
            40.0 + p as f64 * PANEL_H,
        );
    }
    out.push_str("</svg>\n");
    out
}

fn draw_panel(
    out: &mut String,
    panel: &Panel<'_>,
    reports: &[LevelReport],
    labels: &[&str],
    levels: &[usize],
    top: f64,
) {
    let (left, plot_w, plot_h) = (60.0, PANEL_W - 80.0, PANEL_H - 70.0);
    let base = top + 30.0 + plot_h;
    let max = reports.iter().map(panel.value).fold(0.0_f64, f64::max).max(1e-9);
    let _ = writeln!(
        out,
        "<text x=\"{left}\" y=\"{}\" font-weight=\"bold\">{}</text>",
        top + 20.0,
        panel.title
    );
    let _ = writeln!(
        out,
        "<line x1=\"{left}\" y1=\"{base}\" x2=\"{}\" y2=\"{base}\" stroke=\"black\"/>",
        left + plot_w
    );
    let _ = writeln!(
        out,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>",
        left - 4.0,
        top + 34.0,
        short(max)
    );
    let group_w = plot_w / levels.len().max(1) as f64;
    let bar_w = (group_w * 0.8) / labels.len().max(1) as f64;
    for (g, level) in levels.iter().enumerate() {
        let gx = left + g as f64 * group_w + group_w * 0.1;
        let _ = writeln!(
            out,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{level} events</text>",
            gx + group_w * 0.4,
            base + 14.0
        );
        for (i, label) in labels.iter().enumerate() {
            let Some(r) = reports.iter().find(|r| r.events == *level && r.label == *label) else {
                continue;
            };
            let v = (panel.value)(r);
            let h = plot_h * v / max;
            let x = gx + i as f64 * bar_w;
            let _ = writeln!(
                out,
                "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{h:.1}\" fill=\"{}\"><title>{label} {level}: {v:.3}</title></rect>",
                base - h,
                bar_w * 0.9,
                COLORS[i % COLORS.len()]
            );
            let _ = writeln!(
                out,
                "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"9\" text-anchor=\"middle\">{}</text>",
                x + bar_w * 0.45,
                base - h - 2.0,
                short(v)
            );
        }
    }
}

fn short(v: f64) -> String {
    match v {
        v if v >= 1e6 => format!("{:.1}M", v / 1e6),
        v if v >= 1e4 => format!("{:.0}k", v / 1e3),
        v if v >= 100.0 => format!("{v:.0}"),
        v => format!("{v:.2}"),
    }
}
