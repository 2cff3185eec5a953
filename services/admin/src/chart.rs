//! Line charts drawn on the server as SVG: no script, readable without
//! colour (each series has its own dash pattern and marker shape, and the
//! legend repeats them), and always shown beside a table of the same
//! numbers. Labels are escaped here: the markup is inserted as is.

use std::fmt::Write;

/// One line: a name and a value per x position (`None`: no point there).
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub values: Vec<Option<f64>>,
}

const DASHES: [&str; 5] = ["", "6 3", "2 3", "8 3 2 3", "1 5"];
const COLOURS: [&str; 5] = ["#1f5fa8", "#b3541e", "#2e7d32", "#6a3d9a", "#555555"];
const W: f64 = 640.0;
const H: f64 = 220.0;
const LEFT: f64 = 48.0;
const RIGHT: f64 = 12.0;
const TOP: f64 = 12.0;
const BOTTOM: f64 = 40.0;

pub fn escape(s: &str) -> String {
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

fn marker(shape: usize, x: f64, y: f64, colour: &str, label: &str) -> String {
    let title = format!("<title>{}</title>", escape(label));
    match shape % 3 {
        0 => format!(r#"<circle cx="{x:.1}" cy="{y:.1}" r="3.5" fill="{colour}">{title}</circle>"#),
        1 => format!(
            r#"<rect x="{:.1}" y="{:.1}" width="7" height="7" fill="{colour}">{title}</rect>"#,
            x - 3.5,
            y - 3.5
        ),
        _ => format!(
            r#"<path d="M{x:.1} {:.1} L{:.1} {:.1} L{:.1} {:.1} Z" fill="{colour}">{title}</path>"#,
            y - 4.5,
            x + 4.5,
            y + 3.5,
            x - 4.5,
            y + 3.5
        ),
    }
}

/// A chart of `series` over the x labels `xs`; `y_max` fixes the scale
/// (1.0 for rates), otherwise it fits the data. `unit` formats a value.
pub fn lines(
    title: &str,
    xs: &[String],
    series: &[Series],
    y_max: Option<f64>,
    unit: fn(f64) -> String,
) -> String {
    let top = y_max.unwrap_or_else(|| {
        nice_top(
            series
                .iter()
                .flat_map(|s| s.values.iter().flatten())
                .fold(0.0f64, |a, &b| a.max(b)),
        )
    });
    let plot_w = W - LEFT - RIGHT;
    let plot_h = H - TOP - BOTTOM;
    let x_at = |i: usize| {
        if xs.len() <= 1 {
            LEFT + plot_w / 2.0
        } else {
            LEFT + plot_w * i as f64 / (xs.len() - 1) as f64
        }
    };
    let y_at = |v: f64| TOP + plot_h * (1.0 - (v / top).clamp(0.0, 1.0));
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg class="chart" viewBox="0 0 {W} {H}" role="img" aria-label="{}" xmlns="http://www.w3.org/2000/svg"><title>{}</title>"#,
        escape(title),
        escape(title)
    );
    for k in 0..=4 {
        let v = top * k as f64 / 4.0;
        let y = y_at(v);
        let _ = write!(
            svg,
            r##"<line x1="{LEFT}" x2="{:.1}" y1="{y:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" font-size="10" text-anchor="end" fill="#333">{}</text>"##,
            W - RIGHT,
            LEFT - 4.0,
            y + 3.0,
            escape(&unit(v))
        );
    }
    let step = xs.len().div_ceil(6).max(1);
    for (i, x) in xs.iter().enumerate().step_by(step) {
        let _ = write!(
            svg,
            r##"<text x="{:.1}" y="{:.1}" font-size="10" text-anchor="middle" fill="#333">{}</text>"##,
            x_at(i),
            H - BOTTOM + 14.0,
            escape(x)
        );
    }
    for (n, s) in series.iter().enumerate() {
        let colour = COLOURS[n % COLOURS.len()];
        let dash = DASHES[n % DASHES.len()];
        let mut d = String::new();
        let mut pen_up = true;
        for (i, v) in s.values.iter().enumerate() {
            match v {
                Some(v) => {
                    let _ = write!(
                        d,
                        "{}{:.1} {:.1} ",
                        if pen_up { "M" } else { "L" },
                        x_at(i),
                        y_at(*v)
                    );
                    pen_up = false;
                }
                None => pen_up = true,
            }
        }
        let _ = write!(
            svg,
            r#"<path d="{}" fill="none" stroke="{colour}" stroke-width="2" stroke-dasharray="{dash}"/>"#,
            d.trim_end()
        );
        for (i, v) in s.values.iter().enumerate() {
            if let Some(v) = v {
                let label = format!("{}: {} at {}", s.name, unit(*v), xs[i]);
                svg.push_str(&marker(n, x_at(i), y_at(*v), colour, &label));
            }
        }
        // The legend, under the axis: the line's pattern, its marker, its name.
        let lx = LEFT + (n % 3) as f64 * 200.0;
        let ly = H - 12.0 + (n / 3) as f64 * 12.0 - if series.len() > 3 { 6.0 } else { 0.0 };
        let _ = write!(
            svg,
            r#"<line x1="{lx:.1}" x2="{:.1}" y1="{ly:.1}" y2="{ly:.1}" stroke="{colour}" stroke-width="2" stroke-dasharray="{dash}"/>"#,
            lx + 24.0
        );
        svg.push_str(&marker(n, lx + 12.0, ly, colour, &s.name));
        let _ = write!(
            svg,
            r##"<text x="{:.1}" y="{:.1}" font-size="10" fill="#111">{}</text>"##,
            lx + 30.0,
            ly + 3.5,
            escape(&s.name)
        );
    }
    svg.push_str("</svg>");
    svg
}

/// The smallest "round" top (4 gridline steps of 1, 2 or 5 times a power
/// of ten, whole from 1 up) at or above `max`, so the gridlines fall on
/// round values.
fn nice_top(max: f64) -> f64 {
    if max <= 0.0 || !max.is_finite() {
        return 1.0;
    }
    let raw = max / 4.0;
    let power = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * power)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * power);
    // Whole steps once the values reach 1: counts never get a 0.5 line.
    4.0 * if max >= 1.0 { step.max(1.0) } else { step }
}

pub fn count(v: f64) -> String {
    format!("{v:.0}")
}

pub fn percent(v: f64) -> String {
    format!("{:.0}%", 100.0 * v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_escaped_and_gaps_lift_the_pen() {
        let s = Series {
            name: "<script>alert(1)</script>".into(),
            values: vec![Some(1.0), None, Some(2.0)],
        };
        let svg = lines(
            "t",
            &["a".into(), "b".into(), "c".into()],
            &[s],
            None,
            count,
        );
        assert!(!svg.contains("<script>"));
        assert!(svg.contains("&lt;script&gt;"));
        // Two separate runs of the line: it moves twice, draws no segment
        // across the gap.
        let path = svg.split(r#"<path d=""#).nth(1).unwrap();
        let d = &path[..path.find('"').unwrap()];
        assert_eq!(d.matches('M').count(), 2, "{d}");
        assert!(!d.contains('L'), "{d}");
    }

    #[test]
    fn gridlines_fall_on_round_values() {
        assert_eq!(nice_top(1.0), 4.0);
        assert_eq!(nice_top(0.3), 0.4);
        assert_eq!(nice_top(3.0), 4.0);
        assert_eq!(nice_top(7.0), 8.0);
        assert_eq!(nice_top(130.0), 200.0);
        assert_eq!(nice_top(0.0), 1.0);
        let svg = lines(
            "t",
            &["a".into()],
            &[Series {
                name: "n".into(),
                values: vec![Some(7.0)],
            }],
            None,
            count,
        );
        for label in [">0<", ">2<", ">4<", ">6<", ">8<"] {
            assert!(svg.contains(label), "{label}");
        }
    }

    #[test]
    fn each_series_has_its_own_pattern() {
        let mk = |n: &str| Series {
            name: n.into(),
            values: vec![Some(0.5), Some(0.7)],
        };
        let svg = lines(
            "t",
            &["a".into(), "b".into()],
            &[mk("v1"), mk("v2")],
            Some(1.0),
            percent,
        );
        assert!(svg.contains(r#"stroke-dasharray="""#));
        assert!(svg.contains(r#"stroke-dasharray="6 3""#));
        assert!(svg.contains("<circle") && svg.contains("<rect"));
        assert!(svg.contains(">100%<"), "the fixed scale's top");
    }
}
