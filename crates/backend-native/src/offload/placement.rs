//! Where each weight tensor and each sequence's KV cache lives, from the policy's percents.

use bench_core::Policy;

/// A memory tier. On the CPU device `Compute` and `Host` are both RAM, but they are kept apart
/// (separate buffers, explicit copies between them) so the same code drives the CUDA device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Tier {
    /// The compute device's memory (GPU memory; RAM on the CPU device).
    Compute,
    /// Host RAM (pinned when the compute device is CUDA).
    Host,
    /// Files in the offload directory.
    Disk,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Compute => "compute",
            Tier::Host => "host",
            Tier::Disk => "disk",
        }
    }
}

/// FlexLLMGen's `get_choice`: the first of (disk, host, compute) whose cumulative percent
/// exceeds `percent`; the last one when rounding leaves none.
fn choose(percent: f64, gpu: u8, cpu: u8) -> Tier {
    let disk = 100u32.saturating_sub(gpu as u32 + cpu as u32);
    let mut cum = 0f64;
    for (p, t) in [
        (disk, Tier::Disk),
        (cpu as u32, Tier::Host),
        (gpu as u32, Tier::Compute),
    ] {
        cum += p as f64;
        if percent < cum {
            return t;
        }
    }
    Tier::Compute
}

/// Tiers of a group of tensors placed together (one layer, or one half of a layer with
/// `sep_layer`): each tensor whole, by the mid-point of its byte range in the group's cumulative
/// size (FlexLLMGen's `init_weight_list`).
pub fn place_weights(sizes: &[usize], policy: &Policy) -> Vec<Tier> {
    let total: usize = sizes.iter().sum();
    let (gpu, cpu, _) = policy.weights();
    let mut cum = 0usize;
    sizes
        .iter()
        .map(|&s| {
            cum += s;
            let mid = if total == 0 {
                0.0
            } else {
                (cum as f64 - s as f64 / 2.0) / total as f64
            };
            choose(mid * 100.0, gpu, cpu)
        })
        .collect()
}

/// How many of a GPU batch's `n` sequences keep their KV cache on each tier: (compute, host,
/// disk), whole sequences, rounded so the counts sum to `n`.
pub fn split_sequences(n: usize, percents: (u8, u8, u8)) -> (usize, usize, usize) {
    let (g, c, _) = percents;
    let compute = (n * g as usize + 50) / 100;
    let upto_host = ((n * (g as usize + c as usize) + 50) / 100).min(n);
    let compute = compute.min(upto_host);
    (compute, upto_host - compute, n - upto_host)
}

/// The tier of the activations (the policy requires 100% on one).
pub fn activation_tier(policy: &Policy) -> Tier {
    match policy.activations() {
        (100, _, _) => Tier::Compute,
        (_, 100, _) => Tier::Host,
        _ => Tier::Disk,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pol(p: [u8; 6]) -> Policy {
        Policy::new(p)
    }

    #[test]
    fn midpoint_rule_matches_flexllmgen() {
        // An OPT attention half: q,k,v,out weights (h*h) and biases (h), layer norm (h, h).
        let h = 10;
        let sizes = [h * h, h, h * h, h, h * h, h, h * h, h, h, h];
        // all on one tier
        assert!(place_weights(&sizes, &pol([100, 0, 100, 0, 100, 0]))
            .iter()
            .all(|&t| t == Tier::Compute));
        assert!(place_weights(&sizes, &pol([0, 0, 100, 0, 100, 0]))
            .iter()
            .all(|&t| t == Tier::Disk));
        // 50% gpu / 50% cpu: disk 0 -> cpu covers [0, 50), gpu [50, 100): q, k on the host
        // (mid-points 10.9% .. 46.7%), v, out and the small tensors after them on compute
        let t = place_weights(&sizes, &pol([50, 50, 100, 0, 100, 0]));
        assert_eq!(&t[..4], &[Tier::Host; 4]);
        assert_eq!(&t[4..], &[Tier::Compute; 6]);
        // 20 gpu / 30 cpu / 50 disk
        let t = place_weights(&sizes, &pol([20, 30, 100, 0, 100, 0]));
        assert_eq!(t[0], Tier::Disk); // mid 10.9%
        assert_eq!(t[2], Tier::Disk); // mid 34.8%
        assert_eq!(t[4], Tier::Host); // mid 58.7%
        assert_eq!(t[6], Tier::Compute); // mid 82.6%
    }

    #[test]
    fn sequences_split_whole() {
        assert_eq!(split_sequences(4, (100, 0, 0)), (4, 0, 0));
        assert_eq!(split_sequences(4, (0, 0, 100)), (0, 0, 4));
        assert_eq!(split_sequences(4, (50, 50, 0)), (2, 2, 0));
        assert_eq!(split_sequences(3, (0, 50, 50)), (0, 2, 1));
        assert_eq!(split_sequences(5, (20, 30, 50)), (1, 2, 2));
        for n in 1..9 {
            for g in (0..=100).step_by(10) {
                for c in (0..=100 - g).step_by(10) {
                    let (a, b, d) = split_sequences(n, (g as u8, c as u8, (100 - g - c) as u8));
                    assert_eq!(a + b + d, n);
                }
            }
        }
    }
}
