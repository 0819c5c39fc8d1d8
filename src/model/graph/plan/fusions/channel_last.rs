//! Inference: an activation that a convolution writes and only Winograd F(2×2) convolutions read stays
//! channel-last, (N, H, W, C), between them, and those convolutions run on channel-last tiles
//! ([`crate::nn::conv::winograd::channel_last`]), which keep a tile row's transformed input and products in
//! L1 instead of an image's in L2. The writer may also be the one-channel first convolution, which transposes
//! its output rows. A convolution with no channel-last neighbour stays planar: at batch 128 the transposes at
//! both of its edges cost what the tiles save. After the output-pass patterns, so that each convolution's
//! epilogue is final.
//!
//! The values are bitwise the planar forward's; only the memory traffic changes (docs/PERFORMANCE.md §7).

use super::super::builder::Builder;
use super::super::step::StepKind;
use crate::nn::conv::winograd::channel_last::Layouts;
use crate::nn::{Conv2d, ConvAlgo};
use crate::Real;

pub(crate) fn apply<T: Real>(b: &mut Builder<T>) {
    let n = b.steps.len();
    // which convolution steps can read, and which can write, a channel-last activation
    let runs = |i: usize, algo: ConvAlgo| {
        b.steps[i].is_some()
            && match &b.step(i).kind {
                StepKind::Conv(c) => {
                    c.algo == algo
                        && !c.moments
                        && b.nodes[c.node]
                            .layer_as::<Conv2d<T>>()
                            .is_some_and(|l| l.can_run_channel_last(b.in_shape(i), algo))
                }
                _ => false,
            }
    };
    let reads: Vec<bool> = (0..n).map(|i| runs(i, ConvAlgo::Winograd2)).collect();
    let writes: Vec<bool> = (0..n)
        .map(|i| reads[i] || runs(i, ConvAlgo::OneChannel))
        .collect();
    for i in b.live() {
        if !writes[i] {
            continue;
        }
        let out = b.step(i).output;
        let readers = b.readers(out);
        let all_channel_last = !b.outputs.contains(&out)
            && !readers.is_empty()
            && readers
                .iter()
                .all(|&r| reads[r] && b.step(r).inputs.len() == 1);
        if !all_channel_last {
            continue;
        }
        for r in readers {
            layouts(b, r).input = true;
        }
        layouts(b, i).output = true;
    }
}

/// The layouts of convolution step `i`, which now runs channel-last.
fn layouts<'a, T: Real>(b: &'a mut Builder<T>, i: usize) -> &'a mut Layouts {
    match &mut b.step_mut(i).kind {
        StepKind::Conv(c) => c.channel_last.get_or_insert_with(Layouts::default),
        _ => unreachable!("only convolution steps run channel-last"),
    }
}
