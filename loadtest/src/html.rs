//! The HTML report: the figures table and line charts drawn as inline SVG, with no
//! scripts and no external resources, so the file opens anywhere, offline, and can
//! be attached to an issue as it is.

use std::fmt::Write as _;

use crate::report::{Report, Sample};

const WIDTH: f64 = 760.0;
const HEIGHT: f64 = 260.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 16.0;
const TOP: f64 = 34.0;
const BOTTOM: f64 = 36.0;
const Y_TICKS: u32 = 5;
const X_TICKS: f64 = 10.0;

/// One line of a chart.
struct Line {
    name: &'static str,
    color: &'static str,
    values: Vec<Option<f64>>,
    /// Dashed, so a line that coincides with another (what the server forwarded and
    /// what we received) stays visible.
    dashed: bool,
}

impl Line {
    fn new(
        name: &'static str,
        color: &'static str,
        series: &[Sample],
        f: impl Fn(&Sample) -> Option<f64>,
    ) -> Self {
        Self {
            name,
            color,
            values: series.iter().map(f).collect(),
            dashed: false,
        }
    }

    fn dashed(self) -> Self {
        Self {
            dashed: true,
            ..self
        }
    }
}

/// The whole report as one self-contained HTML document.
pub fn render(report: &Report) -> String {
    let s = &report.series;
    let charts = [
        (
            "Throughput",
            "packets/s",
            vec![
                Line::new("received by subscribers", "#1f77b4", s, |x| {
                    Some(x.rates.rx_pps)
                }),
                Line::new("sent by publishers", "#2ca02c", s, |x| Some(x.rates.tx_pps)),
                Line::new("server forwarded", "#ff7f0e", s, |x| {
                    x.rates.server_forwarded_pps
                })
                .dashed(),
                Line::new("server egress datagrams", "#9467bd", s, |x| {
                    x.rates.server_egress_pps
                })
                .dashed(),
            ],
        ),
        (
            "End-to-end latency",
            "ms",
            vec![
                Line::new("p50", "#2ca02c", s, |x| x.latency_p50_ms),
                Line::new("p90", "#ff7f0e", s, |x| x.latency_p90_ms),
                Line::new("p99", "#d62728", s, |x| x.latency_p99_ms),
            ],
        ),
        (
            "CPU",
            "% of one core",
            vec![
                Line::new("server", "#d62728", s, |x| x.server_cpu_pct).dashed(),
                Line::new("harness", "#1f77b4", s, |x| x.harness_cpu_pct),
                Line::new("busiest harness worker", "#17becf", s, |x| {
                    x.worker_cpu_max_pct
                }),
            ],
        ),
        (
            "Participants",
            "participants",
            vec![
                Line::new("joined", "#1f77b4", s, |x| Some(x.joined as f64)),
                Line::new("joining", "#ff7f0e", s, |x| Some(x.connecting as f64)),
                Line::new("on the server", "#7f7f7f", s, |x| {
                    x.server_participants.map(|p| p as f64)
                })
                .dashed(),
            ],
        ),
        (
            "Loss and harness health",
            "% / ms",
            vec![
                Line::new("loss % (stamps)", "#d62728", s, |x| x.loss_pct),
                Line::new("worst timer lag, ms", "#7f7f7f", s, |x| Some(x.lag_ms)),
                Line::new("harness waiting for a CPU, %", "#bcbd22", s, |x| {
                    x.worker_wait_max_pct
                }),
            ],
        ),
    ];
    let times: Vec<f64> = s.iter().map(|x| x.t).collect();

    let mut out = String::with_capacity(64 * 1024);
    out.push_str(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>corelay load report</title><style>\
         body{font:14px system-ui,sans-serif;margin:24px;color:#222;max-width:820px}\
         table{border-collapse:collapse;margin:12px 0}\
         td{padding:3px 10px;border-bottom:1px solid #ddd;vertical-align:top}\
         td:first-child{color:#555;white-space:nowrap}\
         tr.warning td{color:#b00;font-weight:bold}\
         svg{display:block;margin:18px 0;background:#fafafa}\
         svg text{font:11px system-ui,sans-serif;fill:#444}\
         svg .title{font-size:13px;font-weight:bold;fill:#222}\
         </style></head><body>\n<h1>corelay load report</h1>\n",
    );
    let _ = writeln!(
        out,
        "<p>{} against <code>{}</code>, {:.0} s.</p>",
        escape(
            &report
                .scenario
                .preset
                .map_or("custom scenario".into(), |p| format!("{p:?} preset"))
        ),
        escape(&report.scenario.url),
        report.elapsed_s
    );
    out.push_str("<table>\n");
    for (label, value) in report.rows() {
        let class = if label == "WARNING" {
            " class=\"warning\""
        } else {
            ""
        };
        let _ = writeln!(
            out,
            "<tr{class}><td>{}</td><td>{}</td></tr>",
            escape(&label),
            escape(&value)
        );
    }
    out.push_str("</table>\n");
    for (title, unit, lines) in &charts {
        out.push_str(&chart(title, unit, &times, lines));
    }
    out.push_str("</body></html>\n");
    out
}

/// A line chart over time; gaps where a value is missing.
fn chart(title: &str, unit: &str, times: &[f64], lines: &[Line]) -> String {
    let t_max = times.iter().copied().fold(1.0, f64::max);
    let y_max = nice_ceiling(
        lines
            .iter()
            .flat_map(|l| l.values.iter().flatten())
            .copied()
            .fold(0.0, f64::max),
    );
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let x = |t: f64| LEFT + t / t_max * plot_w;
    let y = |v: f64| TOP + plot_h - v / y_max * plot_h;

    let mut svg = String::new();
    let _ = write!(
        svg,
        "<svg width=\"{WIDTH}\" height=\"{HEIGHT}\" viewBox=\"0 0 {WIDTH} {HEIGHT}\" role=\"img\" aria-label=\"{}\">\
         <text class=\"title\" x=\"{LEFT}\" y=\"18\">{} ({})</text>",
        escape(title),
        escape(title),
        escape(unit)
    );
    for i in 0..=Y_TICKS {
        let v = y_max * f64::from(i) / f64::from(Y_TICKS);
        let _ = write!(
            svg,
            "<line x1=\"{LEFT}\" x2=\"{:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#ddd\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            WIDTH - RIGHT,
            y(v),
            y(v),
            LEFT - 6.0,
            y(v) + 4.0,
            number(v)
        );
    }
    let step = nice_ceiling(t_max / X_TICKS);
    let mut t = 0.0;
    while t <= t_max + 1e-9 {
        let _ = write!(
            svg,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}s</text>",
            x(t),
            HEIGHT - BOTTOM + 16.0,
            number(t)
        );
        t += step;
    }
    let mut legend_x = LEFT;
    for line in lines {
        if line.values.iter().all(Option::is_none) {
            continue;
        }
        for segment in segments(times, &line.values) {
            let points: Vec<String> = segment
                .iter()
                .map(|(t, v)| format!("{:.1},{:.1}", x(*t), y(*v)))
                .collect();
            let _ = write!(
                svg,
                "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"1.8\"{} points=\"{}\"/>",
                line.color,
                if line.dashed {
                    " stroke-dasharray=\"6 4\""
                } else {
                    ""
                },
                points.join(" ")
            );
        }
        let _ = write!(
            svg,
            "<rect x=\"{legend_x:.1}\" y=\"{:.1}\" width=\"10\" height=\"10\" fill=\"{}\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\">{}</text>",
            HEIGHT - 12.0,
            line.color,
            legend_x + 14.0,
            HEIGHT - 3.0,
            escape(line.name)
        );
        legend_x += 24.0 + 6.5 * line.name.len() as f64;
    }
    svg.push_str("</svg>\n");
    svg
}

/// Runs of consecutive present values, as (time, value) points.
fn segments(times: &[f64], values: &[Option<f64>]) -> Vec<Vec<(f64, f64)>> {
    let mut out: Vec<Vec<(f64, f64)>> = Vec::new();
    let mut current = Vec::new();
    for (t, v) in times.iter().zip(values) {
        match v {
            Some(v) if v.is_finite() => current.push((*t, *v)),
            _ if !current.is_empty() => out.push(std::mem::take(&mut current)),
            _ => {}
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// The smallest of 1, 2, 2.5, 5 times a power of ten that is at least `v`.
fn nice_ceiling(v: f64) -> f64 {
    if !(v.is_finite() && v > 0.0) {
        return 1.0;
    }
    let magnitude = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0]
        .into_iter()
        .map(|m| m * magnitude)
        .find(|c| *c >= v * (1.0 - 1e-9))
        .unwrap_or(10.0 * magnitude)
}

/// An axis label: whole numbers plainly, small ones with what precision they need.
fn number(v: f64) -> String {
    if v.fract().abs() < 1e-9 || v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::tests::sample_report;

    #[test]
    fn report_is_self_contained_html_with_charts() {
        let mut report = sample_report();
        report.warnings.push("<b>bad</b> & worse".into());
        let html = render(&report);
        assert!(html.starts_with("<!doctype html>"));
        assert!(html.trim_end().ends_with("</html>"));
        assert_eq!(html.matches("<svg").count(), 5);
        assert_eq!(html.matches("</svg>").count(), 5);
        assert!(html.contains("<polyline"));
        for external in ["http://", "https://", "<script", "src=", "href="] {
            assert!(!html.contains(external), "{external}");
        }
        assert!(html.contains("&lt;b&gt;bad&lt;/b&gt; &amp; worse"));
        assert!(html.contains("class=\"warning\""));
    }

    #[test]
    fn gaps_split_lines() {
        let t = [1.0, 2.0, 3.0, 4.0, 5.0];
        let v = [Some(1.0), None, Some(3.0), Some(f64::NAN), Some(5.0)];
        assert_eq!(
            segments(&t, &v),
            vec![vec![(1.0, 1.0)], vec![(3.0, 3.0)], vec![(5.0, 5.0)]]
        );
        // Latency has a gap in the sample report: two polylines for p99.
        let html = chart(
            "x",
            "ms",
            &t,
            &[Line {
                name: "p99",
                color: "#000",
                values: v.to_vec(),
                dashed: true,
            }],
        );
        assert_eq!(html.matches("<polyline").count(), 3);
        assert_eq!(html.matches("stroke-dasharray").count(), 3);
    }

    #[test]
    fn axes_are_round() {
        assert_eq!(nice_ceiling(0.0), 1.0);
        assert_eq!(nice_ceiling(7.3), 10.0);
        assert_eq!(nice_ceiling(180.0), 200.0);
        assert_eq!(nice_ceiling(2.2), 2.5);
        assert_eq!(nice_ceiling(5000.0), 5000.0);
        assert_eq!(nice_ceiling(0.04), 0.05);
        assert_eq!(number(1500.0), "1500");
        assert_eq!(number(2.5), "2.5");
        assert_eq!(number(0.25), "0.25");
    }
}
