//! Semantic segmentation with the library's API: garment scenes drawn on the fly from Fashion-MNIST, a
//! DeepLabV3 with BatchNorm, two epochs of torchvision's recipe, then mIoU and per-class IoU on test scenes.
//!
//! ```text
//! cargo run --release --example segmentation            # 512 train / 128 test scenes, about a minute on 2 cores
//! ```

use normvision::data::fashion_mnist::{self, Split};
use normvision::data::scenes::SceneGenerator;
use normvision::model::deeplab::DeepLabConfig;
use normvision::model::NormKind;
use normvision::segment::{
    batches, train_segmentation, SegData, SegRunOptions, SegSource, SegTrainConfig,
};
use std::sync::Arc;

fn main() -> normvision::Result<()> {
    let train_src = Arc::new(fashion_mnist::load(None, Split::Train)?);
    let test_src = Arc::new(fashion_mnist::load(None, Split::Test)?);
    let names = train_src.classes.clone();
    // scenes 0..512 of seed 1 for training, test scenes from the test split's garments
    let train = SegSource::scenes(SceneGenerator::new(train_src, 64, 1)?, 0, 512)?;
    let test = SegSource::scenes(SceneGenerator::new(test_src, 64, 2)?, 0, 128)?;
    let norm = batches::normalization(&train, 256)?;
    let classes: Vec<String> = std::iter::once("background".to_string())
        .chain(names)
        .collect();
    let model = DeepLabConfig::new(1, classes.len(), NormKind::Batch);
    let mut graph = model.build_graph()?;
    let mut cfg = SegTrainConfig::reference(model);
    cfg.epochs = 2;
    let data = SegData {
        train,
        test,
        norm,
        classes,
    };
    let t = std::time::Instant::now();
    let report = train_segmentation(&cfg, &mut graph, &data, SegRunOptions::default())?;
    let m = report.last().expect("evaluated");
    println!(
        "{} steps in {:.1} s ({:.0} img/s): test mIoU {:.2}%, pixel accuracy {:.2}%",
        report.steps,
        t.elapsed().as_secs_f64(),
        report.train_img_s,
        m.miou * 100.0,
        m.pixel_acc * 100.0
    );
    for (name, iou) in data.classes.iter().zip(&m.iou) {
        println!(
            "  {name:<12} {}",
            iou.map_or("-".into(), |v| format!("{:.2}%", v * 100.0))
        );
    }
    Ok(())
}
