//! The latency CDF of a cascade as SVG drawn on the server: a step line
//! from the fastest leaf to the slowest, with the p50 and p99 marked.

/// Plot area, in SVG user units.
const WIDTH: f64 = 560.0;
const HEIGHT: f64 = 200.0;
/// Room for the axis labels.
const LEFT: f64 = 40.0;
const BOTTOM: f64 = 24.0;
/// Most points drawn, however many leaves: quantiles stand for the rest.
const MAX_POINTS: usize = 400;

/// What the template draws: numbers only, all computed here.
pub(super) struct Cdf {
    /// The `d` attribute of the step line.
    pub path: String,
    pub max_ms: u64,
    pub p50_x: String,
    pub p99_x: String,
    pub p50_ms: u64,
    pub p99_ms: u64,
    pub width: f64,
    pub height: f64,
    pub left: f64,
    pub bottom: f64,
    pub count: usize,
}

impl Cdf {
    /// The CDF of sorted latencies; `None` before any leaf is acknowledged.
    pub(super) fn of(sorted: &[u64]) -> Option<Cdf> {
        let last = *sorted.last()?;
        let max_ms = last.max(1);
        let x = |ms: u64| LEFT + WIDTH * ms as f64 / max_ms as f64;
        let y = |fraction: f64| HEIGHT * (1.0 - fraction);
        let step = sorted.len().div_ceil(MAX_POINTS).max(1);
        let mut path = format!("M{:.1},{:.1}", x(0), y(0.0));
        let mut index = step - 1;
        loop {
            let at = index.min(sorted.len() - 1);
            let fraction = (at + 1) as f64 / sorted.len() as f64;
            path.push_str(&format!(" H{:.1} V{:.1}", x(sorted[at]), y(fraction)));
            if at == sorted.len() - 1 {
                break;
            }
            index += step;
        }
        let p50_ms = crate::cascade::percentile(sorted, 50).unwrap_or(last);
        let p99_ms = crate::cascade::percentile(sorted, 99).unwrap_or(last);
        Some(Cdf {
            path,
            max_ms,
            p50_x: format!("{:.1}", x(p50_ms)),
            p99_x: format!("{:.1}", x(p99_ms)),
            p50_ms,
            p99_ms,
            width: WIDTH + LEFT + 8.0,
            height: HEIGHT + BOTTOM,
            left: LEFT,
            bottom: HEIGHT,
            count: sorted.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_climbs_from_zero_to_one_at_the_slowest_leaf() {
        assert!(Cdf::of(&[]).is_none());
        let cdf = Cdf::of(&[10, 20, 30, 40]).expect("a CDF");
        assert_eq!(cdf.path, "M40.0,200.0 H180.0 V150.0 H320.0 V100.0 H460.0 V50.0 H600.0 V0.0");
        assert_eq!((cdf.p50_ms, cdf.p99_ms, cdf.max_ms), (20, 40, 40));
        let many: Vec<u64> = (0..10_000).collect();
        let cdf = Cdf::of(&many).expect("a CDF");
        assert!(cdf.path.matches('H').count() <= MAX_POINTS, "points are bounded");
        assert!(cdf.path.ends_with("H600.0 V0.0"), "ends at the slowest leaf, 100 %");
    }
}
