//! Seed derivation for every random stream of a run: the engine's per-sample streams, the
//! reward's random order, the learner's shuffles and dropout. One place, so no stream is
//! derived two different ways.

/// SplitMix64's output function: a cheap, well-mixed hash of one u64.
pub fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Combines a seed with one more value (an index, a counter) into a new seed.
pub fn mix(a: u64, b: u64) -> u64 {
    let mut x = a ^ b.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The streams of runs already on disk depend on these exact values.
    #[test]
    fn values_are_stable() {
        assert_eq!(splitmix64(0), 0xe220_a839_7b1d_cdaf);
        assert_ne!(mix(1, 2), mix(2, 1));
        assert_eq!(mix(0, 0), 0);
    }
}
