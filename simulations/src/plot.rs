//! The leaf-latency plot: an SVG cumulative distribution with the p50, p90
//! and p99 marked.

use std::path::Path;

use plotters::prelude::*;

use crate::accounting::Percentiles;

/// Writes the CDF of `latencies_ms` to `path` (SVG).
///
/// # Errors
///
/// When there is nothing to plot or the file cannot be written.
pub fn latency_cdf(path: &Path, latencies_ms: &[f64], title: &str) -> anyhow::Result<()> {
    let mut sorted: Vec<f64> = latencies_ms.iter().copied().filter(|v| v.is_finite()).collect();
    anyhow::ensure!(!sorted.is_empty(), "no latencies to plot");
    sorted.sort_by(f64::total_cmp);
    let percentiles = Percentiles::of(&sorted);
    let x_max = (percentiles.max * 1.05).max(1.0);
    let n = sorted.len() as f64;
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0..x_max, 0.0..1.0)
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_desc("leaf latency (ms, revocation posted → receiver handled the SET)")
        .y_desc("share of leaves delivered")
        .draw()
        .map_err(plot_error)?;
    let mut points = Vec::with_capacity(sorted.len() + 1);
    points.push((0.0, 0.0));
    for (i, value) in sorted.iter().enumerate() {
        points.push((*value, (i + 1) as f64 / n));
    }
    chart
        .draw_series(LineSeries::new(points, BLUE.stroke_width(2)))
        .map_err(plot_error)?
        .label(format!("{} leaves", sorted.len()))
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    let marks = [
        ("p50", percentiles.p50, 0.50, GREEN),
        ("p90", percentiles.p90, 0.90, MAGENTA),
        ("p99", percentiles.p99, 0.99, RED),
    ];
    for (name, value, q, color) in marks {
        chart
            .draw_series(LineSeries::new(vec![(value, 0.0), (value, q)], color.stroke_width(1)))
            .map_err(plot_error)?
            .label(format!("{name} = {value:.0} ms"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        chart.draw_series(std::iter::once(Circle::new((value, q), 4, color.filled()))).map_err(plot_error)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        .map_err(plot_error)?;
    root.present().map_err(plot_error)?;
    Ok(())
}

fn plot_error(error: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("plot: {error}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_an_svg_with_the_percentiles() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("cdf.svg");
        let values: Vec<f64> = (1..=200).map(f64::from).collect();
        latency_cdf(&path, &values, "test").expect("plot");
        let svg = std::fs::read_to_string(&path).expect("read");
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(100)]);
        assert!(svg.contains("p99 = 198 ms"), "percentile label");
        assert!(latency_cdf(&path, &[], "empty").is_err());
    }
}
