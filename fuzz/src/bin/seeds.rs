//! Writes the seed corpora (inputs that parse) into fuzz/corpus/<target>/:
//!   cargo run --manifest-path fuzz/Cargo.toml --bin seeds
//! IDX files (raw and gzipped, images and labels), a tiny checkpoint (a 2x2-image classifier with a Linear,
//! a BatchNorm1d and a GroupNorm-free head, trained for one step so that the optimizer state is there), and small
//! PNG (gray, RGB, RGBA, palette) and JPEG images.
use normvision::data::idx::{encode_idx, IdxArray, IdxData};
use normvision::data::Normalization;
use normvision::model::{Graph, Model, ModelConfig, ModelKind, NormKind};
use normvision::nn::{Flatten, LinearConfig, ReLU};
use normvision::norm::BatchNormConfig;
use normvision::train::{checkpoint, Position, TrainConfig};
use std::io::Write;
use std::path::Path;

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let dir = |t: &str| {
        let d = root.join(t);
        std::fs::create_dir_all(&d).unwrap();
        d
    };
    // IDX
    let d = dir("idx");
    let imgs = IdxArray::new(vec![2, 3, 3], IdxData::U8((0..18).collect())).unwrap();
    let labels = IdxArray::new(vec![2], IdxData::U8(vec![1, 7])).unwrap();
    let f32s = IdxArray::new(vec![2, 2], IdxData::F32(vec![0.5, -1.0, 3.0, 1e-3])).unwrap();
    for (name, a) in [("images", &imgs), ("labels", &labels), ("floats", &f32s)] {
        let raw = encode_idx(a).unwrap();
        std::fs::write(d.join(format!("{name}.idx")), &raw).unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&raw).unwrap();
        std::fs::write(d.join(format!("{name}.idx.gz")), gz.finish().unwrap()).unwrap();
    }
    // Checkpoint
    let mut rng = rand::thread_rng();
    let mut g = Graph::new();
    let x = g.input("x");
    let f = g.layer("flat", Flatten::new(), x).unwrap();
    let l = g
        .layer(
            "fc",
            LinearConfig::new(4, 3).build::<f32>(&mut rng).unwrap(),
            f,
        )
        .unwrap();
    let b = g
        .layer("bn", BatchNormConfig::d1(3).build::<f32>().unwrap(), l)
        .unwrap();
    let r = g.layer("relu", ReLU::new(), b).unwrap();
    let h = g
        .layer(
            "head",
            LinearConfig::new(3, 2).build::<f32>(&mut rng).unwrap(),
            r,
        )
        .unwrap();
    g.set_outputs(&[h]).unwrap();
    let model = Model::from_graph(g, [1, 2, 2]).unwrap();
    let mut cfg = TrainConfig::reference(ModelKind::Mlp, NormKind::Batch);
    cfg.model = ModelConfig {
        height: 2,
        width: 2,
        num_classes: 2,
        ..cfg.model
    };
    let opt = cfg.optim.build().unwrap();
    let pos = Position {
        step: 3,
        epoch: 1,
        batch: 1,
    };
    checkpoint::save(
        &dir("checkpoint").join("tiny.safetensors"),
        &cfg,
        &Normalization::identity(1),
        pos,
        &model,
        opt.as_ref(),
        Some(0.5),
    )
    .unwrap();
    // Images
    let d = dir("image");
    let gray = image::GrayImage::from_fn(5, 4, |x, y| image::Luma([(x * 40 + y * 9) as u8]));
    gray.save(d.join("gray.png")).unwrap();
    let rgb = image::RgbImage::from_fn(4, 3, |x, y| {
        image::Rgb([(x * 60) as u8, (y * 80) as u8, 128])
    });
    rgb.save(d.join("rgb.png")).unwrap();
    rgb.save(d.join("rgb.jpg")).unwrap();
    let rgba = image::RgbaImage::from_fn(3, 3, |x, y| {
        image::Rgba([(x * 80) as u8, (y * 80) as u8, 9, 200])
    });
    rgba.save(d.join("rgba.png")).unwrap();
    gray.save(d.join("gray.jpg")).unwrap();
    println!("seed corpora written under {}", root.display());
}
