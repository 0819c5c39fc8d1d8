//! Seeded random streams derived from a seed and a position, so that every random draw of a run (shuffling,
//! augmentation, dropout masks) is a pure function of the seed and where the run is: a resumed run repeats the
//! uninterrupted one exactly.

use rand_pcg::Pcg64Mcg;

/// FNV-1a (64-bit) of a byte stream: a stable, seedless fingerprint (cache file names, data and replica
/// checks).
pub fn fnv1a(bytes: impl IntoIterator<Item = u8>) -> u64 {
    bytes.into_iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// SplitMix64: a bijective mix of 64 bits.
pub fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// An independent generator for `(seed, position, stream)`: the data loader uses (seed, epoch, 0) to shuffle
/// and (seed, epoch, 1 + i) to augment sample i; dropout uses (seed, step, u64::MAX).
pub fn derive_rng(seed: u64, position: u64, stream: u64) -> Pcg64Mcg {
    let a = mix64(seed ^ mix64(position ^ mix64(stream)));
    let b = mix64(a ^ 0x6A09_E667_F3BC_C908);
    Pcg64Mcg::new(((a as u128) << 64) | b as u128)
}
