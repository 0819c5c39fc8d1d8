//! Inverted dropout (`nn.Dropout`) with its own seeded, checkpointable RNG.
//!
//! | | PyTorch `nn.Dropout(p=0.5)` | here |
//! |---|---|---|
//! | train | zero each element with probability p, scale the rest by 1/(1−p) | same |
//! | eval | identity | same |
//! | p = 1 | all zeros | same |
//! | p outside [0, 1] | error | error |
//! | RNG | global generator | the layer's own [`Pcg64Mcg`], seeded from its seed; with a training step in the context ([`Ctx::with_step`]) it is re-derived from (seed, step) at the step's first forward, so a resumed run draws the masks of the uninterrupted one |
//!
//! Each element draws 32 random bits; it is kept when they are below (1−p)·2³². The train forward saves the
//! mask (as the per-element factor 0 or 1/(1−p)) for the backward.

use super::Layer;
use crate::kernels::shape::contiguous as cont;
use crate::state::{StateDict, Stateful};
use crate::{Ctx, NvError, Param, Real, Result};
use ndarray::ArrayD;
use rand::{RngCore, SeedableRng};
pub use rand_pcg::Pcg64Mcg;

/// Inverted dropout.
#[derive(Debug, Clone)]
pub struct Dropout<T: Real = f32> {
    p: f64,
    seed: u64,
    /// The layer's random number generator.
    rng: Pcg64Mcg,
    /// The step the generator was last derived for ([`Ctx::step`]).
    seeded_for: Option<u64>,
    /// (input shape, factor per element) of the last train forward.
    mask: Option<(Vec<usize>, Vec<T>)>,
}

impl<T: Real> Dropout<T> {
    pub const NAME: &'static str = "Dropout";

    /// Dropout with probability `p` and an RNG seeded from `seed`.
    pub fn new(p: f64, seed: u64) -> Result<Self> {
        if !(0.0..=1.0).contains(&p) {
            return Err(NvError::Config(format!(
                "dropout probability has to be between 0 and 1, but got {p}"
            )));
        }
        Ok(Dropout {
            p,
            seed,
            rng: Pcg64Mcg::seed_from_u64(seed),
            seeded_for: None,
            mask: None,
        })
    }

    pub fn p(&self) -> f64 {
        self.p
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// A copy of the RNG (serde-serialisable), to restore with [`Dropout::set_rng_state`].
    pub fn rng_state(&self) -> Pcg64Mcg {
        self.rng.clone()
    }

    pub fn set_rng_state(&mut self, rng: Pcg64Mcg) {
        self.rng = rng;
    }

    /// Draws a fresh mask for `len` elements.
    fn draw_mask(&mut self, len: usize) -> Vec<T> {
        let keep = 1.0 - self.p;
        let scale = if keep > 0.0 {
            T::of_f64(1.0 / keep)
        } else {
            T::zero()
        };
        // keep iff u32 < threshold; threshold = 2^32 keeps everything.
        let threshold = (keep * 4294967296.0).round() as u64;
        let mut mask = Vec::with_capacity(len);
        let mut bits = 0u64;
        for i in 0..len {
            if i % 2 == 0 {
                bits = self.rng.next_u64();
            } else {
                bits >>= 32;
            }
            let u = bits & 0xFFFF_FFFF;
            mask.push(if u < threshold { scale } else { T::zero() });
        }
        mask
    }
}

impl<T: Real> Layer<T> for Dropout<T> {
    fn forward(&mut self, x: &ArrayD<T>, ctx: Ctx) -> Result<ArrayD<T>> {
        if !ctx.is_train() || self.p == 0.0 {
            self.mask = None;
            return Ok(x.clone());
        }
        if let Some(step) = ctx.step().filter(|&s| self.seeded_for != Some(s)) {
            // stream u64::MAX: unrelated to the data loader's streams (0 = shuffle, 1 + i = augmentation)
            self.rng = crate::rng::derive_rng(self.seed, step, u64::MAX);
            self.seeded_for = Some(step);
        }
        let mut mask = self.draw_mask(x.len());
        let xs = cont(x);
        let mut y = ArrayD::zeros(x.raw_dim());
        crate::kernels::elementwise::zip_map_into(
            &xs,
            &mask,
            y.as_slice_mut().expect("fresh"),
            |v, m| v * m,
        );
        // keep the buffer for the backward
        mask.shrink_to_fit();
        self.mask = Some((x.shape().to_vec(), mask));
        Ok(y)
    }

    /// Eval (or p = 0): identity. Train: dy times the mask of the last train forward, which must have seen an
    /// input of x's shape.
    fn backward(&mut self, x: &ArrayD<T>, dy: &ArrayD<T>, ctx: Ctx) -> Result<ArrayD<T>> {
        crate::kernels::shape::check_same_shape(Self::NAME, x.shape(), dy.shape())?;
        let mode = ctx.mode();
        if !mode.is_train() || self.p == 0.0 {
            return Ok(dy.clone());
        }
        match &self.mask {
            Some((shape, mask)) if shape == x.shape() => {
                let gs = cont(dy);
                let mut dx = ArrayD::zeros(x.raw_dim());
                crate::kernels::elementwise::zip_map_into(
                    &gs,
                    mask,
                    dx.as_slice_mut().expect("fresh"),
                    |g, m| g * m,
                );
                Ok(dx)
            }
            _ => Err(NvError::NoSavedState {
                layer: Self::NAME,
                mode,
            }),
        }
    }

    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        Ok(input.to_vec())
    }

    fn name(&self) -> String {
        format!("Dropout(p={})", self.p)
    }
}

impl<T: Real> Stateful<T> for Dropout<T> {
    fn save_state(&self, _prefix: &str, _sd: &mut StateDict) {}
    fn load_state(&mut self, _prefix: &str, _sd: &StateDict) -> Result<()> {
        Ok(())
    }
    fn visit_params(&mut self, _prefix: &str, _f: &mut dyn FnMut(&str, &mut Param<T>)) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::IxDyn;

    #[test]
    fn keep_rate_scale_and_replay() {
        let mut d = Dropout::<f64>::new(0.3, 42).unwrap();
        let x = ArrayD::from_elem(IxDyn(&[100, 100]), 1.0);
        let saved = serde_json::to_string(&d.rng).unwrap();
        let y = d.forward(&x, Ctx::train()).unwrap();
        let kept = y.iter().filter(|v| **v != 0.0).count() as f64 / 1e4;
        assert!((kept - 0.7).abs() < 0.02, "{kept}");
        assert!(y.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.7).abs() < 1e-12));
        // replaying the RNG state gives the same mask
        d.set_rng_state(serde_json::from_str(&saved).unwrap());
        assert_eq!(d.forward(&x, Ctx::train()).unwrap(), y);
        assert_eq!(d.forward(&x, Ctx::eval()).unwrap(), x);
        let mut all = Dropout::<f32>::new(1.0, 0).unwrap();
        let x = ArrayD::from_elem(IxDyn(&[7]), 2.0f32);
        assert!(all
            .forward(&x, Ctx::train())
            .unwrap()
            .iter()
            .all(|v| *v == 0.0));
        assert!(Dropout::<f32>::new(1.5, 0).is_err());
        assert!(Dropout::<f32>::new(-0.1, 0).is_err());
    }

    /// With a step in the context, the mask is a function of (seed, step) alone: a fresh layer at step 5 draws
    /// what a layer that ran steps 0..=5 drew at step 5, and a second forward of the same step draws on.
    #[test]
    fn masks_follow_the_step() {
        let x = ArrayD::from_elem(IxDyn(&[64]), 1.0f32);
        let mut a = Dropout::<f32>::new(0.5, 9).unwrap();
        let mut at5 = None;
        for step in 0..=5 {
            let y = a.forward(&x, Ctx::train().with_step(step)).unwrap();
            if step == 5 {
                at5 = Some(y);
            }
        }
        let mut b = Dropout::<f32>::new(0.5, 9).unwrap();
        let y = b.forward(&x, Ctx::train().with_step(5)).unwrap();
        assert_eq!(Some(&y), at5.as_ref());
        let again = b.forward(&x, Ctx::train().with_step(5)).unwrap();
        assert_ne!(
            again, y,
            "a second forward of the same step draws a new mask"
        );
        let mut c = Dropout::<f32>::new(0.5, 10).unwrap();
        assert_ne!(c.forward(&x, Ctx::train().with_step(5)).unwrap(), y);
    }
}
