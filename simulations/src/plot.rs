//! The latency plot: SVG cumulative distributions (leaf delivery, and with
//! guards the refusal at the RP) with each series' p50, p90 and p99 marked.

use std::path::Path;

use plotters::prelude::*;

use crate::accounting::Percentiles;

/// Series colours, in order.
const COLOURS: [RGBColor; 3] = [BLUE, RED, GREEN];

/// Writes the CDFs of `series` (name, latencies in ms) to `path` (SVG).
///
/// # Errors
///
/// When the first series is empty or the file cannot be written.
pub fn latency_cdf(path: &Path, series: &[(&str, &[f64])], title: &str) -> anyhow::Result<()> {
    let sorted: Vec<Vec<f64>> = series
        .iter()
        .map(|(_, values)| {
            let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
            sorted.sort_by(f64::total_cmp);
            sorted
        })
        .collect();
    anyhow::ensure!(sorted.first().is_some_and(|s| !s.is_empty()), "no latencies to plot");
    let x_max = (sorted.iter().filter_map(|s| s.last()).copied().fold(0.0, f64::max) * 1.05).max(1.0);
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
        .x_desc(
            "ms from the IdP's revocation post (delivery: the RP acknowledged the SET; refusal: the agent's first 401)",
        )
        .y_desc("share")
        .draw()
        .map_err(plot_error)?;
    for (((name, _), values), colour) in series.iter().zip(&sorted).zip(COLOURS.iter().cycle()) {
        if values.is_empty() {
            continue;
        }
        let colour = *colour;
        let n = values.len() as f64;
        let mut points = Vec::with_capacity(values.len() + 1);
        points.push((0.0, 0.0));
        points.extend(values.iter().enumerate().map(|(i, v)| (*v, (i + 1) as f64 / n)));
        let p = Percentiles::of(values);
        chart
            .draw_series(LineSeries::new(points, colour.stroke_width(2)))
            .map_err(plot_error)?
            .label(format!(
                "{name} ({} samples): p50 = {:.0} ms, p90 = {:.0} ms, p99 = {:.0} ms",
                values.len(),
                p.p50,
                p.p90,
                p.p99
            ))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2)));
        let marks = [(p.p50, 0.50), (p.p90, 0.90), (p.p99, 0.99)];
        chart
            .draw_series(marks.iter().map(|&(value, q)| Circle::new((value, q), 4, colour.filled())))
            .map_err(plot_error)?;
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
    fn writes_an_svg_with_each_series_percentiles() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("cdf.svg");
        let delivery: Vec<f64> = (1..=200).map(f64::from).collect();
        let refusal: Vec<f64> = (1..=100).map(|v| f64::from(v) * 3.0).collect();
        latency_cdf(&path, &[("delivery", &delivery), ("refusal", &refusal)], "test").expect("plot");
        let svg = std::fs::read_to_string(&path).expect("read");
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(100)]);
        assert!(svg.contains("p99 = 198 ms"), "the delivery percentile label");
        assert!(svg.contains("refusal (100 samples)") && svg.contains("p99 = 297 ms"), "the refusal series");
        assert!(latency_cdf(&path, &[("empty", &[])], "empty").is_err());
    }
}
