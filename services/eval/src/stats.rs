//! The statistics behind a decision.
//!
//! **Offline, candidate vs champion on the same items: paired bootstrap.**
//! Every item is answered by both models, so the comparison is paired: item
//! difficulty cancels, and only the items where the two disagree move the
//! difference. The 95% interval is the percentile interval of the mean
//! difference over 2,000 resamples of the items (the same resample for both
//! models). Why the bootstrap rather than an exact sign test: one method
//! serves every metric we report (pass rates, preference margins, losses,
//! latency percentiles), it needs no distributional assumption, and its
//! interval is on the scale of the metric ("−1.2 to +3.5 points"), which
//! is what a promotion policy states. The resampling is seeded, so the same
//! evaluation gives the same interval.
//!
//! **Online, the canary's thumbs: a Bayesian comparison.** Each arm's
//! thumbs-up rate gets a Beta(1 + up, 1 + down) posterior (uniform prior);
//! [`prob_better`] is the exact probability that the canary's rate exceeds
//! the champion's. The canary is promoted when that probability passes a
//! threshold (0.95) and rolled back when it falls under its complement
//! (0.05), but only once both arms have a minimum number of votes, which
//! keeps early noise from deciding; a canary still undecided at its
//! deadline is rolled back. The posterior means the same thing however
//! often it is looked at, which a fixed-sample p-value does not; its
//! frequentist error still grows with the number of looks, which is what
//! the minimum sample and the 0.95 threshold hold down.

/// A 95% interval and the point estimate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Interval {
    pub estimate: f64,
    pub low: f64,
    pub high: f64,
}

/// splitmix64: a small seeded generator for resampling.
struct Mix(u64);

impl Mix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

pub const RESAMPLES: usize = 2000;

/// The paired difference `stat(candidate) - stat(champion)` over items,
/// with its percentile bootstrap interval. `candidate[i]` and `champion[i]`
/// are the two models' values on item `i`.
pub fn paired(
    candidate: &[f64],
    champion: &[f64],
    stat: impl Fn(&mut dyn Iterator<Item = f64>) -> f64,
) -> Interval {
    assert_eq!(candidate.len(), champion.len(), "paired values");
    let n = candidate.len();
    let of = |values: &[f64], idx: &[usize]| stat(&mut idx.iter().map(|&i| values[i]));
    let all: Vec<usize> = (0..n).collect();
    let estimate = of(candidate, &all) - of(champion, &all);
    if n == 0 {
        return Interval {
            estimate: 0.0,
            low: 0.0,
            high: 0.0,
        };
    }
    let mut rng = Mix(0x5EED);
    let mut diffs: Vec<f64> = (0..RESAMPLES)
        .map(|_| {
            let idx: Vec<usize> = (0..n).map(|_| rng.below(n)).collect();
            of(candidate, &idx) - of(champion, &idx)
        })
        .collect();
    diffs.sort_by(f64::total_cmp);
    let at = |q: f64| diffs[((q * RESAMPLES as f64) as usize).min(RESAMPLES - 1)];
    Interval {
        estimate,
        low: at(0.025),
        high: at(0.975),
    }
}

/// The lower bound [`paired`] gives the best candidate possible on `items`
/// pass/fail items of which the champion fails `failed`: one that passes
/// every item. When even that bound is not above a bar, the items cannot
/// show any candidate better than the champion: they are saturated.
pub fn best_lower_bound(items: usize, failed: usize) -> f64 {
    let champion: Vec<f64> = (0..items)
        .map(|i| f64::from(u8::from(i >= failed)))
        .collect();
    paired(&vec![1.0; items], &champion, mean).low
}

/// The mean, as a statistic for [`paired`].
pub fn mean(values: &mut dyn Iterator<Item = f64>) -> f64 {
    let (mut sum, mut n) = (0.0, 0usize);
    for v in values {
        sum += v;
        n += 1;
    }
    if n == 0 { 0.0 } else { sum / n as f64 }
}

/// A quantile (0.5: the median), as a statistic for [`paired`].
pub fn quantile(q: f64) -> impl Fn(&mut dyn Iterator<Item = f64>) -> f64 + Copy {
    move |values| {
        let mut v: Vec<f64> = values.collect();
        if v.is_empty() {
            return 0.0;
        }
        v.sort_by(f64::total_cmp);
        v[((q * (v.len() - 1) as f64).round() as usize).min(v.len() - 1)]
    }
}

/// `ln Γ(x)` for `x > 0` (Lanczos, g = 7).
fn ln_gamma(x: f64) -> f64 {
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection.
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut a = C[0];
    let t = x + 7.5;
    for (i, c) in C.iter().enumerate().skip(1) {
        a += c / (x + i as f64);
    }
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

fn ln_beta(a: f64, b: f64) -> f64 {
    ln_gamma(a) + ln_gamma(b) - ln_gamma(a + b)
}

/// `P(p_a > p_b)` when `p_a ~ Beta(1 + up_a, 1 + down_a)` and `p_b ~
/// Beta(1 + up_b, 1 + down_b)`, exactly (a finite sum over `up_a + 1`
/// terms, Evan Miller's formula).
pub fn prob_better(up_a: u64, down_a: u64, up_b: u64, down_b: u64) -> f64 {
    // The sum runs over p_a's first parameter, 1 + up_a.
    let ba = 1.0 + down_a as f64;
    let (ab, bb) = (1.0 + up_b as f64, 1.0 + down_b as f64);
    let mut p = 0.0;
    for i in 0..=up_a {
        let i = i as f64;
        p += (ln_beta(ab + i, ba + bb) - (ba + i).ln() - ln_beta(1.0 + i, ba) - ln_beta(ab, bb))
            .exp();
    }
    p.clamp(0.0, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paired_intervals_cover_the_difference_and_shrink_with_agreement() {
        // The candidate passes 30 more of 100 items: a clear win.
        let cand: Vec<f64> = (0..100).map(|i| if i < 80 { 1.0 } else { 0.0 }).collect();
        let champ: Vec<f64> = (0..100).map(|i| if i < 50 { 1.0 } else { 0.0 }).collect();
        let d = paired(&cand, &champ, mean);
        assert!((d.estimate - 0.30).abs() < 1e-12);
        assert!(
            d.low > 0.15 && d.low < 0.30 && d.high > 0.30 && d.high < 0.45,
            "{d:?}"
        );
        // The same totals but disagreeing both ways on 70 items: wider.
        let shuffled: Vec<f64> = (0..100).map(|i| if i >= 50 { 1.0 } else { 0.0 }).collect();
        let wide = paired(&cand, &shuffled, mean);
        assert!((wide.estimate - 0.30).abs() < 1e-12);
        assert!(wide.high - wide.low > d.high - d.low, "{wide:?} vs {d:?}");
        // Identical answers: no difference and no uncertainty.
        let same = paired(&cand, &cand, mean);
        assert_eq!((same.low, same.high), (0.0, 0.0));
        // Seeded: the same input gives the same interval.
        assert_eq!(paired(&cand, &shuffled, mean), wide);
    }

    #[test]
    fn quantiles_are_order_statistics() {
        let q = quantile(0.95);
        assert_eq!(q(&mut (1..=100).map(f64::from)), 95.0);
        assert_eq!(quantile(0.5)(&mut [3.0, 1.0, 2.0].into_iter()), 2.0);
    }

    #[test]
    fn prob_better_is_exact() {
        assert!((prob_better(0, 0, 0, 0) - 0.5).abs() < 1e-9);
        // Symmetric.
        let (p, q) = (prob_better(30, 10, 20, 20), prob_better(20, 20, 30, 10));
        assert!((p + q - 1.0).abs() < 1e-9, "{p} + {q}");
        assert!(p > 0.95, "{p}");
        // Against numerical integration of the densities.
        let (a1, b1, a2, b2) = (7.0f64, 4.0f64, 5.0f64, 6.0f64);
        let dens = |x: f64, a: f64, b: f64| {
            ((a - 1.0) * x.ln() + (b - 1.0) * (1.0 - x).ln() - ln_beta(a, b)).exp()
        };
        let steps = 4000;
        let mut cdf2 = 0.0;
        let mut integral = 0.0;
        for k in 1..steps {
            let x = k as f64 / steps as f64;
            cdf2 += dens(x, a2, b2) / steps as f64;
            integral += dens(x, a1, b1) * cdf2 / steps as f64;
        }
        let exact = prob_better(6, 3, 4, 5);
        assert!((exact - integral).abs() < 2e-3, "{exact} vs {integral}");
        // Many votes, a real difference: near certainty; the same rate: even.
        assert!(prob_better(700, 300, 600, 400) > 0.999);
        assert!((prob_better(500, 500, 500, 500) - 0.5).abs() < 1e-6);
    }
}

/// The Wilson score interval (95%) of a proportion, `successes` of `n`:
/// sound at small `n` and near 0 or 1, where the normal approximation is
/// not. `n = 0` gives the whole of [0, 1].
pub fn wilson(successes: usize, n: usize) -> Interval {
    if n == 0 {
        return Interval {
            estimate: 0.0,
            low: 0.0,
            high: 1.0,
        };
    }
    let (z, n_f) = (1.959_963_984_540_054_f64, n as f64);
    let p = successes as f64 / n_f;
    let denom = 1.0 + z * z / n_f;
    let centre = (p + z * z / (2.0 * n_f)) / denom;
    let half = z * (p * (1.0 - p) / n_f + z * z / (4.0 * n_f * n_f)).sqrt() / denom;
    Interval {
        estimate: p,
        low: (centre - half).max(0.0),
        high: (centre + half).min(1.0),
    }
}

#[cfg(test)]
mod wilson_tests {
    use super::wilson;

    #[test]
    fn matches_the_textbook_values() {
        // 8 of 10: Wilson's 95% interval is 0.490 to 0.943.
        let i = wilson(8, 10);
        assert!(
            (i.low - 0.4902).abs() < 1e-3 && (i.high - 0.9433).abs() < 1e-3,
            "{i:?}"
        );
        // All of 20: the upper bound is 1, the lower 0.839.
        let i = wilson(20, 20);
        assert!((i.low - 0.8389).abs() < 1e-3 && i.high == 1.0, "{i:?}");
        assert_eq!((wilson(0, 0).low, wilson(0, 0).high), (0.0, 1.0));
    }
}
