//! Misuse of every normalization layer is a typed [`NvError`], never a panic: wrong rank, wrong channel count,
//! invalid configuration, a single value per channel in training, backward without (or mismatched with) forward,
//! dy / buffer size mismatches, and state dicts with missing keys or wrong shapes.

use crate::common;
use common::Relu;
use ndarray::{ArrayD, Dimension, IxDyn};
use normvision::norm::*;
use normvision::state::{StateDict, StateTensor, Stateful};
use normvision::{Ctx, Layer, NvError};

fn data(shape: &[usize]) -> ArrayD<f32> {
    ArrayD::from_shape_fn(IxDyn(shape), |i| {
        i.slice()
            .iter()
            .enumerate()
            .map(|(k, v)| ((k + 1) * (v + 1)) as f32)
            .sum::<f32>()
            * 0.1
    })
}

/// Runs `f` and fails the test with a clear message if it panics instead of returning.
fn no_panic<R>(what: &str, f: impl FnOnce() -> R) -> R {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(_) => panic!("{what}: panicked instead of returning an error"),
    }
}

macro_rules! assert_err {
    ($what:expr, $e:expr, $pat:pat) => {{
        let r = no_panic($what, || $e);
        match r {
            Err(e @ $pat) => e,
            Err(e) => panic!("{}: wrong error variant: {e:?}", $what),
            Ok(_) => panic!("{}: expected an error, got Ok", $what),
        }
    }};
}

fn bn(c: usize) -> BatchNorm<f32> {
    BatchNormConfig::new(c).build().unwrap()
}

// ---------------------------------------------------------------------------------------------------------------
// rank

#[test]
fn wrong_rank() {
    let mut b2: BatchNorm<f32> = BatchNormConfig::d2(3).build().unwrap();
    let e = assert_err!(
        "BN2d on 3-D",
        b2.forward(&data(&[2, 3, 4]), Ctx::train()),
        NvError::Rank { .. }
    );
    if let NvError::Rank { layer, got, .. } = &e {
        assert_eq!(*layer, "BatchNorm");
        assert_eq!(got, &vec![2, 3, 4]);
    }
    assert_err!(
        "BN2d on 5-D",
        b2.forward(&data(&[2, 3, 2, 2, 2]), Ctx::eval()),
        NvError::Rank { .. }
    );
    let mut b1: BatchNorm<f32> = BatchNormConfig::d1(3).build().unwrap();
    assert_err!(
        "BN1d on 4-D",
        b1.forward(&data(&[2, 3, 2, 2]), Ctx::train()),
        NvError::Rank { .. }
    );
    assert_err!(
        "BN1d on 1-D",
        b1.forward(&data(&[3]), Ctx::train()),
        NvError::Rank { .. }
    );
    let mut b3: BatchNorm<f32> = BatchNormConfig::d3(3).build().unwrap();
    assert_err!(
        "BN3d on 4-D",
        b3.forward(&data(&[2, 3, 2, 2]), Ctx::train()),
        NvError::Rank { .. }
    );
    assert_err!(
        "BN (any rank) on 1-D",
        bn(3).forward(&data(&[3]), Ctx::train()),
        NvError::Rank { .. }
    );
    assert_err!(
        "BN on 0-D",
        bn(3).forward(&data(&[]), Ctx::eval()),
        NvError::Rank { .. }
    );

    let mut in2: InstanceNorm<f32> = InstanceNormConfig::d2(3).affine(true).build().unwrap();
    assert_err!(
        "IN2d on 2-D",
        in2.forward(&data(&[3, 4]), Ctx::train()),
        NvError::Rank { .. }
    );
    assert_err!(
        "IN2d on 5-D",
        in2.forward(&data(&[2, 3, 4, 4, 4]), Ctx::train()),
        NvError::Rank { .. }
    );
    let mut in1: InstanceNorm<f32> = InstanceNormConfig::d1(3).build().unwrap();
    assert_err!(
        "IN1d on 4-D",
        in1.forward(&data(&[2, 3, 4, 4]), Ctx::train()),
        NvError::Rank { .. }
    );

    let mut gn: GroupNorm<f32> = GroupNormConfig::new(1, 3).build().unwrap();
    assert_err!(
        "GN on 1-D",
        gn.forward(&data(&[3]), Ctx::train()),
        NvError::Rank { .. }
    );
    let mut fz: FrozenBatchNorm<f32> = FrozenBatchNormConfig::new(3).eps(1e-5).build().unwrap();
    assert_err!(
        "FrozenBN on 1-D",
        fz.forward(&data(&[3]), Ctx::eval()),
        NvError::Rank { .. }
    );
    let mut bcn: BatchChannelNorm<f32> = BatchChannelNormConfig::new(3).build().unwrap();
    assert_err!(
        "BCN on 1-D",
        bcn.forward(&data(&[3]), Ctx::train()),
        NvError::Rank { .. }
    );
}

// ---------------------------------------------------------------------------------------------------------------
// channels

#[test]
fn channel_mismatch() {
    let x = data(&[2, 4, 3, 3]);
    let e = assert_err!(
        "BN",
        bn(3).forward(&x, Ctx::train()),
        NvError::Channels { .. }
    );
    if let NvError::Channels { expected, got, .. } = e {
        assert_eq!((expected, got), (3, 4));
    }
    assert_err!(
        "BN eval",
        bn(3).forward(&x, Ctx::eval()),
        NvError::Channels { .. }
    );
    let mut gn: GroupNorm<f32> = GroupNormConfig::new(1, 3).build().unwrap();
    assert_err!("GN", gn.forward(&x, Ctx::train()), NvError::Channels { .. });
    let mut fz: FrozenBatchNorm<f32> = FrozenBatchNormConfig::new(3).eps(1e-5).build().unwrap();
    assert_err!(
        "FrozenBN",
        fz.forward(&x, Ctx::eval()),
        NvError::Channels { .. }
    );
    let mut bcn: BatchChannelNorm<f32> = BatchChannelNormConfig::new(3).build().unwrap();
    assert_err!(
        "BCN",
        bcn.forward(&x, Ctx::train()),
        NvError::Channels { .. }
    );
    let mut ina: InstanceNorm<f32> = InstanceNormConfig::d2(3).affine(true).build().unwrap();
    assert_err!(
        "IN affine",
        ina.forward(&x, Ctx::train()),
        NvError::Channels { .. }
    );
    let mut int: InstanceNorm<f32> = InstanceNormConfig::d2(3)
        .track_running_stats(true)
        .build()
        .unwrap();
    assert_err!(
        "IN tracked",
        int.forward(&x, Ctx::eval()),
        NvError::Channels { .. }
    );
    // Unbatched (C, H, W) input: C is dim 0.
    assert_err!(
        "IN affine unbatched",
        ina.forward(&data(&[4, 3, 3]), Ctx::train()),
        NvError::Channels { .. }
    );
    // Without affine or running stats PyTorch accepts (and only warns about) any channel count.
    let mut plain: InstanceNorm<f32> = InstanceNormConfig::d2(3).build().unwrap();
    assert!(plain.forward(&x, Ctx::train()).is_ok());
}

// ---------------------------------------------------------------------------------------------------------------
// configuration

#[test]
fn invalid_eps() {
    for eps in [0.0, -1e-5, f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let w = format!("eps {eps}");
        assert_err!(
            &w,
            BatchNormConfig::new(3).eps(eps).build::<f32>(),
            NvError::Config(_)
        );
        assert_err!(
            &w,
            BatchNormConfig::keras(3).eps(eps).build::<f64>(),
            NvError::Config(_)
        );
        assert_err!(
            &w,
            GroupNormConfig::new(1, 3).eps(eps).build::<f32>(),
            NvError::Config(_)
        );
        assert_err!(
            &w,
            LayerNormConfig::new(&[3]).eps(eps).build::<f32>(),
            NvError::Config(_)
        );
        assert_err!(
            &w,
            InstanceNormConfig::d2(3).eps(eps).build::<f32>(),
            NvError::Config(_)
        );
        assert_err!(
            &w,
            FrozenBatchNormConfig::new(3).eps(eps).build::<f32>(),
            NvError::Config(_)
        );
        let mut cfg = BatchChannelNormConfig::new(3);
        cfg.eps = eps;
        assert_err!(&w, cfg.build::<f32>(), NvError::Config(_));
    }
}

#[test]
fn momentum_outside_unit_interval() {
    for m in [-0.1, 1.5, f64::NAN, f64::INFINITY] {
        let w = format!("momentum {m}");
        assert_err!(
            &w,
            BatchNormConfig::new(3).momentum(Some(m)).build::<f32>(),
            NvError::Config(_)
        );
        assert_err!(
            &w,
            BatchNormConfig::keras(3).momentum(Some(m)).build::<f32>(),
            NvError::Config(_)
        );
        assert_err!(
            &w,
            InstanceNormConfig::d2(3).momentum(Some(m)).build::<f32>(),
            NvError::Config(_)
        );
        let mut cfg = BatchChannelNormConfig::new(3);
        cfg.momentum = Some(m);
        assert_err!(&w, cfg.build::<f32>(), NvError::Config(_));
    }
    // The end points and None (cumulative average) are valid.
    for m in [Some(0.0), Some(1.0), None] {
        assert!(BatchNormConfig::new(3).momentum(m).build::<f32>().is_ok());
    }
}

#[test]
fn zero_sizes_and_bad_groups() {
    assert_err!(
        "GN 4 % 3",
        GroupNormConfig::new(3, 4).build::<f32>(),
        NvError::Config(_)
    );
    assert_err!(
        "GN 6 % 4",
        GroupNormConfig::new(4, 6).build::<f32>(),
        NvError::Config(_)
    );
    assert_err!(
        "GN G=0",
        GroupNormConfig::new(0, 4).build::<f32>(),
        NvError::Config(_)
    );
    assert_err!(
        "GN C=0",
        GroupNormConfig::new(1, 0).build::<f32>(),
        NvError::Config(_)
    );
    assert_err!(
        "BN C=0",
        BatchNormConfig::new(0).build::<f32>(),
        NvError::Config(_)
    );
    assert_err!(
        "FrozenBN C=0",
        FrozenBatchNormConfig::new(0).eps(1e-5).build::<f32>(),
        NvError::Config(_)
    );
    assert_err!(
        "BCN C=0",
        BatchChannelNormConfig::new(0).build::<f32>(),
        NvError::Config(_)
    );
    assert_err!(
        "IN C=0",
        InstanceNormConfig::d2(0).build::<f32>(),
        NvError::Config(_)
    );
    assert_err!(
        "IN 0 spatial dims",
        InstanceNormConfig::new(3, 0).build::<f32>(),
        NvError::Config(_)
    );
    assert_err!(
        "IN 4 spatial dims",
        InstanceNormConfig::new(3, 4).build::<f32>(),
        NvError::Config(_)
    );
    assert_err!(
        "LN []",
        LayerNormConfig::new(&[]).build::<f32>(),
        NvError::Config(_)
    );
    assert_err!(
        "LN [3,0]",
        LayerNormConfig::new(&[3, 0]).build::<f32>(),
        NvError::Config(_)
    );
    // A BatchNorm without running statistics cannot be frozen or folded.
    let b: BatchNorm<f32> = BatchNormConfig::new(3)
        .track_running_stats(false)
        .build()
        .unwrap();
    assert_err!(
        "freeze untracked",
        FrozenBatchNorm::from_batch_norm(&b),
        NvError::Config(_)
    );
    assert!(
        b.eval_affine().is_none(),
        "an untracked BatchNorm has no eval affine to fold"
    );
}

#[test]
fn layer_norm_shape_mismatch() {
    let mut ln: LayerNorm<f32> = LayerNormConfig::new(&[4, 5]).build().unwrap();
    assert_err!(
        "LN [4,5] on (2,5,4)",
        ln.forward(&data(&[2, 5, 4]), Ctx::train()),
        NvError::Shape { .. }
    );
    assert_err!(
        "LN [4,5] on (2,3,4)",
        ln.forward(&data(&[2, 3, 4]), Ctx::eval()),
        NvError::Shape { .. }
    );
    assert_err!(
        "LN [4,5] on (5,)",
        ln.forward(&data(&[5]), Ctx::train()),
        NvError::Shape { .. }
    );
    assert!(ln.forward(&data(&[4, 5]), Ctx::train()).is_ok());
    assert!(ln.forward(&data(&[2, 3, 4, 5]), Ctx::train()).is_ok());
}

// ---------------------------------------------------------------------------------------------------------------
// a single value per channel in training

#[test]
fn one_value_per_channel_when_training() {
    for shape in [
        vec![1, 3],
        vec![1, 3, 1, 1],
        vec![1, 3, 1],
        vec![1, 3, 1, 1, 1],
    ] {
        let x = data(&shape);
        let w = format!("BN {shape:?}");
        let e = assert_err!(
            &w,
            bn(3).forward(&x, Ctx::train()),
            NvError::OneValuePerChannel { .. }
        );
        let msg = e.to_string();
        assert!(
            msg.contains("Expected more than 1 value per channel when training"),
            "{w}: message {msg:?}"
        );
        // Eval with running statistics, and eval without them (PyTorch only checks in training), are fine.
        assert!(bn(3).forward(&x, Ctx::eval()).is_ok(), "{w}: eval");
        let mut untracked: BatchNorm<f32> = BatchNormConfig::new(3)
            .track_running_stats(false)
            .build()
            .unwrap();
        assert!(
            untracked.forward(&x, Ctx::eval()).is_ok(),
            "{w}: eval untracked"
        );
        let mut bcn: BatchChannelNorm<f32> = BatchChannelNormConfig::new(3).build().unwrap();
        let e = assert_err!(
            &w,
            bcn.forward(&x, Ctx::train()),
            NvError::OneValuePerChannel { .. }
        );
        assert!(e
            .to_string()
            .contains("Expected more than 1 value per channel when training"));
    }
    // A failed training forward must not touch the running statistics.
    let mut b = bn(3);
    let _ = b.forward(&data(&[1, 3]), Ctx::train());
    assert_eq!(b.num_batches_tracked(), 0);
    assert!(b.running_mean().unwrap().iter().all(|v| *v == 0.0));
    // Two values per channel are enough.
    assert!(bn(3).forward(&data(&[2, 3]), Ctx::train()).is_ok());
    assert!(bn(3).forward(&data(&[1, 3, 2]), Ctx::train()).is_ok());
}

#[test]
fn instance_norm_one_spatial_element_when_training() {
    let mut inorm: InstanceNorm<f32> = InstanceNormConfig::d2(3).affine(true).build().unwrap();
    assert_err!(
        "IN (2,3,1,1)",
        inorm.forward(&data(&[2, 3, 1, 1]), Ctx::train()),
        NvError::OneSpatialElement { .. }
    );
    let msg = inorm
        .forward(&data(&[2, 3, 1, 1]), Ctx::train())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("Expected more than 1 spatial element when training"),
        "{msg}"
    );
    assert_err!(
        "IN unbatched (3,1,1)",
        inorm.forward(&data(&[3, 1, 1]), Ctx::train()),
        NvError::OneSpatialElement { .. }
    );
    let mut in1: InstanceNorm<f32> = InstanceNormConfig::d1(3).build().unwrap();
    assert_err!(
        "IN1d (4,3,1)",
        in1.forward(&data(&[4, 3, 1]), Ctx::train()),
        NvError::OneSpatialElement { .. }
    );
    // GroupNorm allows one value per group (PyTorch does too).
    let mut gn: GroupNorm<f32> = GroupNormConfig::new(3, 3).build().unwrap();
    assert!(gn.forward(&data(&[2, 3, 1, 1]), Ctx::train()).is_ok());
}

// ---------------------------------------------------------------------------------------------------------------
// backward misuse

fn all_layers() -> Vec<Box<dyn Layer<f32>>> {
    vec![
        Box::new(bn(3)),
        Box::new(Relu(BatchNormConfig::new(3).build::<f32>().unwrap())),
        Box::new(GroupNormConfig::new(3, 3).build::<f32>().unwrap()),
        Box::new(LayerNormConfig::new(&[4, 5]).build::<f32>().unwrap()),
        Box::new(
            InstanceNormConfig::d2(3)
                .affine(true)
                .track_running_stats(true)
                .build::<f32>()
                .unwrap(),
        ),
        Box::new(BatchChannelNormConfig::new(3).build::<f32>().unwrap()),
    ]
}

#[test]
fn backward_without_forward() {
    let x = data(&[2, 3, 4, 5]);
    for mut l in all_layers() {
        for mode in [Ctx::train(), Ctx::eval()] {
            let w = format!("{} {mode:?}", l.name());
            let e = assert_err!(&w, l.backward(&x, &x, mode), NvError::NoSavedState { .. });
            if let NvError::NoSavedState { mode: m, .. } = e {
                assert_eq!(m, mode.mode());
            }
        }
    }
}

#[test]
fn backward_after_forward_on_other_shape_or_mode() {
    let x = data(&[2, 3, 4, 5]);
    let x2 = data(&[3, 3, 4, 5]);
    for mut l in all_layers() {
        let name = l.name();
        l.forward(&x, Ctx::train()).unwrap();
        assert_err!(
            &format!("{name}: other shape"),
            l.backward(&x2, &x2, Ctx::train()),
            NvError::NoSavedState { .. }
        );
        assert!(
            l.backward(&x, &x, Ctx::train()).is_ok(),
            "{name}: matching backward"
        );
    }
    // Layers whose train and eval computations differ refuse a backward in the other mode.
    let mut b = bn(3);
    b.forward(&x, Ctx::train()).unwrap();
    assert_err!(
        "BN train fwd, eval bwd",
        b.backward(&x, &x, Ctx::eval()),
        NvError::NoSavedState { .. }
    );
    b.forward(&x, Ctx::eval()).unwrap();
    assert_err!(
        "BN eval fwd, train bwd",
        b.backward(&x, &x, Ctx::train()),
        NvError::NoSavedState { .. }
    );
    let mut bcn: BatchChannelNorm<f32> = BatchChannelNormConfig::new(3).build().unwrap();
    bcn.forward(&x, Ctx::eval()).unwrap();
    assert_err!(
        "BCN eval fwd, train bwd",
        bcn.backward(&x, &x, Ctx::train()),
        NvError::NoSavedState { .. }
    );
    let mut inorm: InstanceNorm<f32> = InstanceNormConfig::d2(3)
        .track_running_stats(true)
        .build()
        .unwrap();
    inorm.forward(&x, Ctx::train()).unwrap();
    assert_err!(
        "IN train fwd, eval bwd",
        inorm.backward(&x, &x, Ctx::eval()),
        NvError::NoSavedState { .. }
    );
    // A state load invalidates what the forward saved.
    let mut b = bn(3);
    b.forward(&x, Ctx::train()).unwrap();
    let sd = b.state_dict();
    b.load_state("", &sd).unwrap();
    assert_err!(
        "BN after load_state",
        b.backward(&x, &x, Ctx::train()),
        NvError::NoSavedState { .. }
    );
}

#[test]
fn dy_shape_mismatch() {
    let x = data(&[2, 3, 4, 5]);
    let dy = data(&[2, 3, 5, 4]);
    let mut layers = all_layers();
    layers.push(Box::new(
        FrozenBatchNormConfig::new(3)
            .eps(1e-5)
            .build::<f32>()
            .unwrap(),
    ));
    for mut l in layers {
        for mode in [Ctx::train(), Ctx::eval()] {
            let w = format!("{} {mode:?}", l.name());
            l.forward(&x, mode).unwrap();
            assert_err!(&w, l.backward(&x, &dy, mode), NvError::Shape { .. });
        }
    }
}

#[test]
fn buffer_size_mismatch() {
    let x = data(&[2, 3, 4, 5]);
    let layers: Vec<Box<dyn NormLayer<f32>>> = vec![
        Box::new(bn(3)),
        Box::new(GroupNormConfig::new(3, 3).build::<f32>().unwrap()),
        Box::new(LayerNormConfig::new(&[4, 5]).build::<f32>().unwrap()),
        Box::new(
            InstanceNormConfig::d2(3)
                .affine(true)
                .track_running_stats(true)
                .build::<f32>()
                .unwrap(),
        ),
        Box::new(BatchChannelNormConfig::new(3).build::<f32>().unwrap()),
        Box::new(
            FrozenBatchNormConfig::new(3)
                .eps(1e-5)
                .build::<f32>()
                .unwrap(),
        ),
    ];
    for mut l in layers {
        for mode in [Ctx::train(), Ctx::eval()] {
            let w = format!("{} {mode:?}", l.name());
            let mut short = vec![0.0f32; x.len() - 1];
            let mut long = vec![0.0f32; x.len() + 1];
            assert_err!(
                &w,
                l.forward_into(x.view(), &mut short, mode),
                NvError::Shape { .. }
            );
            assert_err!(
                &w,
                l.forward_into(x.view(), &mut long, mode),
                NvError::Shape { .. }
            );
            l.forward(&x, mode).unwrap();
            assert_err!(
                &w,
                l.backward_into(x.view(), x.view(), &mut short, mode),
                NvError::Shape { .. }
            );
            assert_err!(
                &w,
                l.backward_into(x.view(), x.view(), &mut long, mode),
                NvError::Shape { .. }
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// state dicts

fn drop_key(sd: &StateDict, key: &str) -> StateDict {
    let mut s = sd.clone();
    assert!(s.tensors.remove(key).is_some(), "no key {key}");
    s
}

fn reshape_key(sd: &StateDict, key: &str) -> StateDict {
    let mut s = sd.clone();
    let t = s.tensors.get_mut(key).unwrap();
    let n = t.shape().iter().product::<usize>();
    *t = StateTensor::F32(ArrayD::zeros(IxDyn(&[n + 1])));
    s
}

fn check_state_errors(what: &str, l: &mut dyn Layer<f32>, float_keys: &[&str]) {
    let sd = l.state_dict();
    let keys: Vec<&str> = sd.keys().map(|s| s.as_str()).collect();
    for k in float_keys {
        assert!(keys.contains(k), "{what}: state dict lacks {k}: {keys:?}");
        let e = assert_err!(
            &format!("{what}: missing {k}"),
            l.load_state("", &drop_key(&sd, k)),
            NvError::State(_)
        );
        assert!(e.to_string().contains(k), "{what}: message {e}");
        assert_err!(
            &format!("{what}: wrong shape {k}"),
            l.load_state("", &reshape_key(&sd, k)),
            NvError::State(_)
        );
        let mut int = sd.clone();
        int.tensors
            .insert(k.to_string(), StateTensor::I64(ArrayD::zeros(IxDyn(&[3]))));
        assert_err!(
            &format!("{what}: int64 {k}"),
            l.load_state("", &int),
            NvError::State(_)
        );
    }
    // Under a prefix every key is missing.
    assert_err!(
        &format!("{what}: prefix"),
        l.load_state("block.bn", &sd),
        NvError::State(_)
    );
    assert!(l.load_state("", &sd).is_ok(), "{what}: round trip");
}

#[test]
fn state_dict_missing_key_or_wrong_shape() {
    let stats = ["weight", "bias", "running_mean", "running_var"];
    check_state_errors("BN", &mut bn(3), &stats);
    check_state_errors(
        "FrozenBN",
        &mut FrozenBatchNormConfig::new(3)
            .eps(1e-5)
            .build::<f32>()
            .unwrap(),
        &stats,
    );
    check_state_errors(
        "GN",
        &mut GroupNormConfig::new(1, 3).build::<f32>().unwrap(),
        &["weight", "bias"],
    );
    check_state_errors(
        "LN",
        &mut LayerNormConfig::new(&[4, 5]).build::<f32>().unwrap(),
        &["weight", "bias"],
    );
    check_state_errors(
        "IN",
        &mut InstanceNormConfig::d2(3)
            .affine(true)
            .track_running_stats(true)
            .build::<f32>()
            .unwrap(),
        &stats,
    );
    check_state_errors(
        "BCN",
        &mut BatchChannelNormConfig::new(3).build::<f32>().unwrap(),
        &["weight", "bias", "l", "running_mean", "running_var"],
    );
    // num_batches_tracked may be absent (old PyTorch checkpoints): not an error, the count becomes 0.
    let mut b = bn(3);
    b.forward(&data(&[2, 3]), Ctx::train()).unwrap();
    let sd = drop_key(&b.state_dict(), "num_batches_tracked");
    let mut b2 = bn(3);
    b2.load_state("", &sd).unwrap();
    assert_eq!(b2.num_batches_tracked(), 0);
}
