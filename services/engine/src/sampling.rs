//! Choosing the next token: penalties, temperature, top-k, top-p, seeded
//! randomness, and the log-probabilities OpenAI's API reports.

pub use flywheel_model::rng::Rng;

/// Sampling knobs of one request, already validated by the caller.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    pub top_p: f32,
    /// 0 means no top-k cut.
    pub top_k: usize,
    pub seed: Option<u64>,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    pub logprobs: bool,
    pub top_logprobs: usize,
    /// Keep generating past end-of-turn tokens (benchmarks want exact lengths).
    pub ignore_eos: bool,
    /// Score these tokens instead of sampling: each step takes the next one
    /// and reports its log-probability (evaluations score given answers
    /// this way, on the serving path). With `max_tokens` at most their
    /// number the generation ends after the last; with more, the model
    /// goes on writing from there (a text completion that echoes its
    /// prompt with log-probabilities), and `max_tokens` counts both.
    pub forced: Vec<u32>,
    /// `response_format`: only output that keeps to this JSON shape
    /// (constrained decoding, [`crate::grammar`]).
    pub json: Option<std::sync::Arc<crate::grammar::Node>>,
    /// Added to these tokens' logits before anything else (OpenAI's
    /// `logit_bias`: -100 all but bans a token, 100 all but forces it).
    pub logit_bias: Vec<(u32, f32)>,
    /// May a greedy request guess tokens ahead (speculative decoding, where
    /// the engine's `speculative` allows it)? The text is the same either
    /// way; a probe of the model's own cost per token turns it off, since
    /// how many guesses are kept depends on what the text repeats.
    pub speculative: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            max_tokens: 256,
            stop: Vec::new(),
            logprobs: false,
            top_logprobs: 0,
            ignore_eos: false,
            forced: Vec::new(),
            json: None,
            logit_bias: Vec::new(),
            speculative: true,
        }
    }
}

/// Temperatures below this decode greedily: dividing logits by less would
/// overflow to infinity (1e-38 did, and sampled garbage), and the
/// distribution is that of the argmax anyway.
pub const MIN_TEMPERATURE: f32 = 1e-5;

pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
    counts: std::collections::HashMap<u32, u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = params
            .seed
            .map(Rng::seeded)
            .unwrap_or_else(Rng::from_entropy);
        Self {
            params,
            rng,
            counts: Default::default(),
        }
    }

    /// Picks the next token from raw logits (modified in place).
    pub fn sample(&mut self, logits: &mut [f32]) -> u32 {
        let p = &self.params;
        for &(tok, bias) in &p.logit_bias {
            if let Some(l) = logits.get_mut(tok as usize) {
                *l += bias;
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&tok, &n) in &self.counts {
                if let Some(l) = logits.get_mut(tok as usize) {
                    *l -= p.presence_penalty + p.frequency_penalty * n as f32;
                }
            }
        }
        let chosen = if p.temperature < MIN_TEMPERATURE {
            argmax(logits)
        } else {
            self.sample_random(logits)
        };
        *self.counts.entry(chosen).or_default() += 1;
        chosen
    }

    fn sample_random(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (i as u32, l / p.temperature))
            .collect();
        if cand.is_empty() {
            return 0;
        }
        if p.top_k > 0 && p.top_k < cand.len() {
            cand.select_nth_unstable_by(p.top_k - 1, |a, b| b.1.total_cmp(&a.1));
            cand.truncate(p.top_k);
        }
        // Ties broken by token id so the order never depends on the sort.
        cand.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let max = cand[0].1;
        let mut probs: Vec<f64> = cand.iter().map(|c| ((c.1 - max) as f64).exp()).collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= total);
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            let keep = probs
                .iter()
                .position(|&x| {
                    acc += x;
                    acc >= p.top_p as f64
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
        }
        let total: f64 = probs.iter().sum();
        let mut r = self.rng.next_f64() * total;
        for (i, &x) in probs.iter().enumerate() {
            r -= x;
            if r < 0.0 {
                return cand[i].0;
            }
        }
        cand[probs.len() - 1].0
    }
}

pub fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best as u32
}

/// The `n` highest entries of `logprobs`, best first.
pub fn top_n(logprobs: &[f32], n: usize) -> Vec<(u32, f32)> {
    let mut all: Vec<(u32, f32)> = logprobs
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, l))
        .collect();
    let n = n.min(all.len());
    if n == 0 {
        return Vec::new();
    }
    all.select_nth_unstable_by(n - 1, |a, b| b.1.total_cmp(&a.1));
    all.truncate(n);
    all.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            seed: Some(42),
            ..Default::default()
        }
    }

    #[test]
    fn greedy_takes_the_argmax() {
        let mut s = Sampler::new(params(0.0));
        assert_eq!(s.sample(&mut [0.1, 3.0, 2.0]), 1);
    }

    #[test]
    fn tiny_temperatures_are_greedy() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 7) % 11) as f32 * 0.9 - 3.0).collect();
        let best = argmax(&logits);
        for t in [1e-38f32, 1e-20, 1e-6] {
            let mut s = Sampler::new(params(t));
            for _ in 0..20 {
                assert_eq!(s.sample(&mut logits.clone()), best, "temperature {t}");
            }
        }
    }

    #[test]
    fn same_seed_same_choices_different_seed_differs() {
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let draw = |seed| {
            let mut s = Sampler::new(SamplingParams {
                seed: Some(seed),
                ..params(1.0)
            });
            (0..40)
                .map(|_| s.sample(&mut logits.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(1), draw(1));
        assert_ne!(draw(1), draw(2));
    }

    #[test]
    fn top_k_one_is_greedy_and_top_p_cuts_the_tail() {
        let mut s = Sampler::new(SamplingParams {
            top_k: 1,
            ..params(1.0)
        });
        for _ in 0..20 {
            assert_eq!(s.sample(&mut [1.0, 1.5, 0.2]), 1);
        }
        // p(token 0) ~ 0.9: top_p 0.5 keeps only it.
        let mut s = Sampler::new(SamplingParams {
            top_p: 0.5,
            ..params(1.0)
        });
        for _ in 0..20 {
            assert_eq!(s.sample(&mut [5.0, 2.7, 0.0]), 0);
        }
    }

    #[test]
    fn frequency_penalty_discourages_repeats() {
        let mut s = Sampler::new(SamplingParams {
            frequency_penalty: 2.0,
            ..params(0.0)
        });
        assert_eq!(s.sample(&mut [1.0, 0.5]), 0);
        // Token 0 was used once: 1.0 - 2.0 < 0.5.
        assert_eq!(s.sample(&mut [1.0, 0.5]), 1);
    }

    #[test]
    fn sampling_follows_the_distribution() {
        let mut s = Sampler::new(params(1.0));
        let logits = [0.0f32, (3.0f32).ln()]; // p = 0.25, 0.75
        let ones = (0..4000)
            .filter(|_| s.sample(&mut logits.clone()) == 1)
            .count();
        assert!((2800..3200).contains(&ones), "{ones}");
    }

    #[test]
    fn top_n_is_sorted() {
        assert_eq!(
            top_n(&[-3.0, -0.5, -1.0, -2.0], 2),
            vec![(1, -0.5), (2, -1.0)]
        );
    }
}
