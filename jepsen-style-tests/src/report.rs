//! Reports: the summary printed on stdout and `report.html`, a single file
//! with hand-written SVG (no network assets): a timeline of operations per
//! client process with fault windows shaded, and latency over time.

use std::fmt::Write as _;

use crate::checker::{overall, Finding, Verdict};
use crate::history::{EventType, FaultWindow, Operation};

/// Counts for the summary.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    pub ok: usize,
    pub fail: usize,
    pub info: usize,
    pub faults: usize,
}

pub fn counts(ops: &[Operation], faults: &[FaultWindow]) -> Counts {
    let mut c = Counts {
        faults: faults.len(),
        ..Counts::default()
    };
    for o in ops {
        match o.outcome {
            EventType::Ok => c.ok += 1,
            EventType::Fail => c.fail += 1,
            _ => c.info += 1,
        }
    }
    c
}

/// The text summary.
pub fn summary(title: &str, c: &Counts, findings: &[Finding]) -> String {
    let mut s = format!(
        "{title}\n  operations: {} ok, {} fail, {} info; faults injected: {}\n",
        c.ok, c.fail, c.info, c.faults
    );
    for f in findings {
        let _ = writeln!(s, "  {:<13} {:?}: {}", f.checker, f.verdict, f.summary);
        if f.verdict != Verdict::Valid {
            for d in f.details.iter().take(20) {
                let _ = writeln!(s, "      {d}");
            }
        }
    }
    let _ = writeln!(s, "  verdict: {:?}", overall(findings));
    s
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The whole `report.html`.
pub fn html(
    title: &str,
    ops: &[Operation],
    faults: &[FaultWindow],
    findings: &[Finding],
) -> String {
    let c = counts(ops, faults);
    let end_ns = ops
        .iter()
        .map(|o| o.complete_ns.unwrap_or(o.invoke_ns))
        .chain(faults.iter().map(|f| f.stop_ns.unwrap_or(f.start_ns)))
        .max()
        .unwrap_or(1)
        .max(1);
    let mut processes: Vec<u64> = ops.iter().map(|o| o.process).collect();
    processes.sort_unstable();
    processes.dedup();
    let (width, left, lane) = (1100.0f64, 90.0f64, 14.0f64);
    let x = |ns: u64| left + (ns as f64 / end_ns as f64) * (width - left - 10.0);
    let height = 30.0 + lane * processes.len() as f64;

    let mut svg = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' font-family='monospace' font-size='10'>"
    );
    for f in faults {
        let (a, b) = (x(f.start_ns), x(f.stop_ns.unwrap_or(end_ns)));
        let _ = write!(
            svg,
            "<rect x='{a:.1}' y='0' width='{:.1}' height='{height}' fill='#f4c7c3' opacity='0.6'><title>{}</title></rect>",
            (b - a).max(1.0),
            esc(&f.what)
        );
    }
    for (lane_i, p) in processes.iter().enumerate() {
        let y = 20.0 + lane * lane_i as f64;
        let label = if *p == crate::checker::lost_writes::FINAL_PROCESS {
            "final".to_string()
        } else {
            format!("p{p}")
        };
        let _ = write!(svg, "<text x='2' y='{:.1}'>{label}</text>", y + 9.0);
        for o in ops.iter().filter(|o| o.process == *p) {
            let a = x(o.invoke_ns);
            let b = x(o.complete_ns.unwrap_or(end_ns));
            let color = match o.outcome {
                EventType::Ok => "#3a9d5d",
                EventType::Fail => "#9e9e9e",
                _ => "#e69500",
            };
            let _ = write!(
                svg,
                "<rect x='{a:.1}' y='{y:.1}' width='{:.1}' height='{:.1}' fill='{color}'><title>{}</title></rect>",
                (b - a).max(1.0),
                lane - 3.0,
                esc(&crate::checker::linearizable::describe(o))
            );
        }
    }
    let _ = write!(
        svg,
        "<text x='{left}' y='12'>0s</text><text x='{:.1}' y='12'>{:.1}s</text></svg>",
        width - 60.0,
        end_ns as f64 / 1e9
    );

    // Latency over time: one dot per completed op, log-free linear scale.
    let (lh, lmax) = (
        220.0f64,
        ops.iter()
            .filter_map(|o| o.complete_ns.map(|c| c.saturating_sub(o.invoke_ns)))
            .max()
            .unwrap_or(1)
            .max(1) as f64,
    );
    let mut lat = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{:.0}' font-family='monospace' font-size='10'>",
        lh + 20.0
    );
    for f in faults {
        let (a, b) = (x(f.start_ns), x(f.stop_ns.unwrap_or(end_ns)));
        let _ = write!(
            lat,
            "<rect x='{a:.1}' y='0' width='{:.1}' height='{lh}' fill='#f4c7c3' opacity='0.6'/>",
            (b - a).max(1.0)
        );
    }
    for o in ops {
        if let Some(c) = o.complete_ns {
            let l = c.saturating_sub(o.invoke_ns) as f64;
            let y = lh - (l / lmax) * (lh - 10.0);
            let color = match o.outcome {
                EventType::Ok => "#3a9d5d",
                EventType::Fail => "#9e9e9e",
                _ => "#e69500",
            };
            let _ = write!(
                lat,
                "<circle cx='{:.1}' cy='{y:.1}' r='1.5' fill='{color}'/>",
                x(c)
            );
        }
    }
    let _ = write!(
        lat,
        "<text x='2' y='12'>{:.0} ms</text><text x='2' y='{lh}'>0</text></svg>",
        lmax / 1e6
    );

    let mut body = format!(
        "<!doctype html><html><head><meta charset='utf-8'><title>{t}</title><style>body{{font-family:sans-serif;margin:1em}} .Invalid{{color:#b00}} .Valid{{color:#070}} .Unknown{{color:#a60}} pre{{background:#f6f6f6;padding:.5em}}</style></head><body><h1>{t}</h1>",
        t = esc(title)
    );
    let _ = write!(
        body,
        "<p>{} ok, {} fail, {} info; {} faults. Overall: <b class='{:?}'>{:?}</b></p><h2>Checkers</h2><ul>",
        c.ok,
        c.fail,
        c.info,
        c.faults,
        overall(findings),
        overall(findings)
    );
    for f in findings {
        let _ = write!(
            body,
            "<li><b>{}</b> <span class='{:?}'>{:?}</span>: {}",
            esc(&f.checker),
            f.verdict,
            f.verdict,
            esc(&f.summary)
        );
        if !f.details.is_empty() {
            let _ = write!(body, "<pre>{}</pre>", esc(&f.details.join("\n")));
        }
        body.push_str("</li>");
    }
    let _ = write!(
        body,
        "</ul><h2>Timeline</h2><p>One lane per client process; green ok, grey fail, orange info (unknown); shaded: faults (hover for details).</p>{svg}<h2>Latency</h2>{lat}<h2>Faults</h2><ul>"
    );
    for f in faults {
        let _ = write!(
            body,
            "<li>{:.2}s – {}: {}</li>",
            f.start_ns as f64 / 1e9,
            f.stop_ns
                .map(|s| format!("{:.2}s", s as f64 / 1e9))
                .unwrap_or_else(|| "end".into()),
            esc(&f.what)
        );
    }
    body.push_str("</ul></body></html>\n");
    body
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checker::Finding;
    use crate::history::OpKind;

    #[test]
    fn html_has_a_lane_per_process_and_shaded_faults() {
        let op = |p, t| Operation {
            process: p,
            kind: OpKind::Write,
            path: "r".into(),
            to: None,
            value: Some("<v>".into()),
            expect: None,
            version: Some(1),
            outcome: EventType::Ok,
            node: Some(1),
            base: None,
            invoke_ns: t,
            complete_ns: Some(t + 5),
            error: None,
        };
        let faults = [FaultWindow {
            what: "kill -9 node 2".into(),
            start_ns: 3,
            stop_ns: Some(8),
        }];
        let page = html(
            "run",
            &[op(1, 0), op(2, 4)],
            &faults,
            &[Finding::valid("x", "fine".into())],
        );
        assert!(page.contains(">p1<") && page.contains(">p2<"));
        assert!(page.contains("kill -9 node 2"));
        assert!(page.contains("&lt;v&gt;"), "values are escaped");
        assert!(!page.contains("<script"), "no scripts");
        assert!(
            !page.contains("src=") && !page.contains("href="),
            "no remote assets"
        );
    }
}
