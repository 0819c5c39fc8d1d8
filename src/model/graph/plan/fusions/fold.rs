//! BatchNorm folding (inference): a convolution (or a linear layer) followed by an eval-mode BatchNorm (or a
//! FrozenBatchNorm) becomes one convolution (linear layer) with W' = a·W and b' = a·b + c (a = weight/sqrt(running_var + eps), c = bias −
//! running_mean·a), computed in f64 and rounded once, and the norm node is removed. It applies wherever the
//! convolution's output is read by the norm alone, inside residual blocks too.
//!
//! The folded convolution computes W'x + b', which differs from the unfolded (Wx + b)·a + c by rounding only,
//! but by rounding of the *folded* quantities: where the norm subtracts a large running mean (|mean|/std up to
//! 1e5 in f32), W'x + b' cancels `b'` against `W'x` and keeps about 24 − log2(|mean|/std) good bits, so its
//! error relative to the output's range grows in proportion to |mean|/std (about 1e-7·|mean|/std; 6.7e-4 of
//! max|y| measured at |mean|/std = 1e5 in `tests/numerics_eval.rs::pytorch_eval_formula_misses_the_bound`,
//! which computes the same x·a + (bias − mean·a)). The norm layers' own eval pass computes (x − mean)·a + bias
//! and is exact to f32 rounding at any |mean|/std. The inference plan's convolution epilogue
//! ([`super::conv_affine`]) applies y·a + (bias − mean·a) too, and shares this bound; fold only for deployment
//! where it is acceptable (it is far below f32 resolution for activations whose mean is not large against
//! their spread).

use crate::model::graph::Node;
use crate::model::graph::{Graph, Op, ValueId};
use crate::nn::{Conv2d, Linear};
use crate::norm::{BatchNorm, EvalAffine, FrozenBatchNorm};
use crate::{Real, Result};

/// The eval affine of node `n` when it is a foldable norm.
fn norm_affine<T: Real>(g: &Graph<T>, n: usize) -> Option<EvalAffine> {
    let node = &g.nodes[n];
    if let Some(bn) = node.layer_as::<BatchNorm<T>>() {
        return bn.eval_affine();
    }
    node.layer_as::<FrozenBatchNorm<T>>()
        .map(|f| f.eval_affine())
}

/// The output channels of a layer a norm can fold into: a convolution, or a linear layer (BatchNorm1d).
fn foldable_channels<T: Real>(node: &Node<T>) -> Option<usize> {
    if let Some(c) = node.layer_as::<Conv2d<T>>() {
        return Some(c.config().out_channels);
    }
    node.layer_as::<Linear<T>>()
        .map(|l| l.config().out_features)
}

/// Folds every foldable (convolution or linear layer, norm) pair of `g`; returns how many.
pub(crate) fn fold<T: Real>(g: &mut Graph<T>) -> Result<usize> {
    let mut folded = 0;
    while let Some((conv, norm, aff)) = find(g) {
        let node = &mut g.nodes[conv];
        if let Some(c) = node.layer_as_mut::<Conv2d<T>>() {
            c.fold_affine(&aff.scale, &aff.shift)?;
        } else {
            node.layer_as_mut::<Linear<T>>()
                .expect("found as a convolution or a linear layer")
                .fold_affine(&aff.scale, &aff.shift)?;
        }
        let keep = node.output;
        remove_node(g, norm, keep);
        folded += 1;
    }
    Ok(folded)
}

/// The first (convolution node, norm node, affine) that folds.
fn find<T: Real>(g: &Graph<T>) -> Option<(usize, usize, EvalAffine)> {
    for (n, node) in g.nodes.iter().enumerate() {
        let Some(aff) = norm_affine(g, n) else {
            continue;
        };
        let input = node.inputs[0];
        let Some(p) = g.values[input.0].producer else {
            continue;
        };
        let Some(channels) = foldable_channels(&g.nodes[p]) else {
            continue;
        };
        let readers = g.nodes.iter().filter(|m| m.inputs.contains(&input)).count();
        if readers == 1 && !g.outputs.contains(&input) && channels == aff.channels() {
            return Some((p, n, aff));
        }
    }
    None
}

/// Removes node `n`, whose readers read `alias` instead, and its output value.
fn remove_node<T: Real>(g: &mut Graph<T>, n: usize, alias: ValueId) {
    let gone = g.nodes.remove(n);
    debug_assert!(matches!(gone.op, Op::Layer(_)));
    let dead = gone.output;
    let map = |v: ValueId| -> ValueId {
        let v = if v == dead { alias } else { v };
        if v.0 > dead.0 {
            ValueId(v.0 - 1)
        } else {
            v
        }
    };
    for node in &mut g.nodes {
        for v in &mut node.inputs {
            *v = map(*v);
        }
        node.output = map(node.output);
    }
    for v in g.inputs.iter_mut().chain(g.outputs.iter_mut()) {
        *v = map(*v);
    }
    g.values.remove(dead.0);
    for info in &mut g.values {
        if let Some(p) = info.producer.as_mut() {
            if *p > n {
                *p -= 1;
            }
        }
    }
}
