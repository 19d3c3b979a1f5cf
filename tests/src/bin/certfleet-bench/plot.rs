//! The benchmark's plots, as SVG: the SVG backend writes text as `<text>`
//! elements, so no system font is needed to draw (only to view) them.

use std::path::Path;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// Pixel size of every plot.
const SIZE: (u32, u32) = (900, 500);
/// Colours of successive series, readable on white.
const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// A bar per `(label, value)`, each bar's value written above it, on a
/// logarithmic axis (the clients differ by two orders of magnitude).
pub(super) fn bars(
    path: &Path,
    title: &str,
    y_desc: &str,
    unit: &str,
    bars: &[(String, f64)],
) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let top = bars.iter().map(|b| b.1).fold(1.0, f64::max) * 2.0;
    let bottom = bars.iter().map(|b| b.1).fold(top, f64::min).max(1.0) / 2.0;
    let labels: Vec<String> = bars.iter().map(|b| b.0.clone()).collect();
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        // A segmented 0..n has n + 1 segments: one per bar is 0..n - 1.
        .build_cartesian_2d(
            (0..bars.len().saturating_sub(1)).into_segmented(),
            (bottom..top).log_scale(),
        )?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .y_desc(y_desc)
        .y_label_formatter(&|v| format!("{v:.0}"))
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => labels.get(*i).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .draw()?;
    for (i, (_, value)) in bars.iter().enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        let mut bar = Rectangle::new(
            [
                (SegmentValue::Exact(i), bottom),
                (SegmentValue::Exact(i + 1), *value),
            ],
            colour.filled(),
        );
        bar.set_margin(0, 0, 20, 20);
        chart.draw_series(std::iter::once(bar))?;
        chart.draw_series(std::iter::once(Text::new(
            format!("{value:.0} {unit}"),
            (SegmentValue::CenterOf(i), *value * 1.08),
            ("sans-serif", 15)
                .into_font()
                .color(&BLACK)
                .pos(Pos::new(HPos::Center, VPos::Bottom)),
        )))?;
    }
    root.present()?;
    Ok(())
}

/// One line per `(name, points)`, with a marker at each point; the x axis
/// is logarithmic when `log_x` (node counts from 1 to 1,000).
pub(super) fn lines(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    log_x: bool,
    series: &[(String, Vec<(f64, f64)>)],
) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let points = series.iter().flat_map(|s| s.1.iter());
    let (x_max, y_max) = points.fold((1.0f64, 1.0f64), |(x, y), p| (x.max(p.0), y.max(p.1)));
    let mut builder = ChartBuilder::on(&root);
    builder
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70);
    let y = 0f64..y_max * 1.1;
    if log_x {
        let mut chart = builder.build_cartesian_2d((1f64..x_max * 1.2).log_scale(), y)?;
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc(y_desc)
            .y_label_formatter(&|v| format!("{v:.0}"))
            .x_label_formatter(&|v| format!("{v:.0}"))
            .draw()?;
        draw_series(&mut chart, series)?;
    } else {
        let mut chart = builder.build_cartesian_2d(0f64..x_max * 1.05, y)?;
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc(y_desc)
            .draw()?;
        draw_series(&mut chart, series)?;
    }
    root.present()?;
    Ok(())
}

fn draw_series<'a, X>(
    chart: &mut ChartContext<
        'a,
        SVGBackend<'a>,
        Cartesian2d<X, plotters::coord::types::RangedCoordf64>,
    >,
    series: &[(String, Vec<(f64, f64)>)],
) -> anyhow::Result<()>
where
    X: Ranged<ValueType = f64>,
{
    for (i, (name, points)) in series.iter().enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                colour.stroke_width(2),
            ))?
            .label(name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
            });
        chart.draw_series(
            points
                .iter()
                .map(move |p| Circle::new(*p, 4, colour.filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bar_chart_names_every_client_and_its_value() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bars.svg");
        let data = [
            ("certfleet", 136.0),
            ("certbot 2.1", 2645.0),
            ("lego 4.9", 28700.0),
        ];
        let data: Vec<(String, f64)> = data.iter().map(|(n, v)| (n.to_string(), *v)).collect();
        bars(&path, "wall time", "ms", "ms", &data).expect("drawing");
        let svg = std::fs::read_to_string(&path).expect("reading the SVG");
        for text in ["certfleet", "certbot 2.1", "lego 4.9", "136 ms", "28700 ms"] {
            assert!(svg.contains(text), "{text} missing from the plot");
        }
        if let Ok(out) = std::env::var("CERTFLEET_PLOT_SAMPLE") {
            std::fs::copy(&path, out).expect("copying the sample");
        }
    }

    #[test]
    fn a_line_chart_names_every_series() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("lines.svg");
        let series = vec![
            (
                "distribute".to_owned(),
                vec![(1.0, 20.0), (100.0, 150.0), (1000.0, 1600.0)],
            ),
            (
                "restart".to_owned(),
                vec![(1.0, 10.0), (100.0, 300.0), (1000.0, 3400.0)],
            ),
        ];
        lines(&path, "scale", "nodes", "ms", true, &series).expect("drawing");
        let svg = std::fs::read_to_string(&path).expect("reading the SVG");
        for text in ["distribute", "restart", "nodes"] {
            assert!(svg.contains(text), "{text} missing from the plot");
        }
        if let Ok(out) = std::env::var("CERTFLEET_PLOT_SAMPLE") {
            std::fs::copy(&path, out.replace(".svg", "-lines.svg")).expect("copying the sample");
        }
    }
}
