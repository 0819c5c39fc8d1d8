//! `normvision coco-eval`: COCO box AP of a detections file, as pycocotools prints it.

use normvision::detect::{coco_eval, load_detections, CocoDataset};
use normvision::Result;
use serde_json::json;
use std::path::Path;

pub fn run(gt: &Path, dets: &Path, as_json: bool) -> Result<()> {
    let data = CocoDataset::load(gt)?;
    let found = load_detections(dets, &data)?;
    let ev = coco_eval::evaluate(&data, &found);
    let names: std::collections::HashMap<i64, &str> = data
        .categories
        .iter()
        .map(|c| (c.id, c.name.as_str()))
        .collect();
    let per_cat = ev.per_category_ap();
    if as_json {
        let stats: serde_json::Map<String, serde_json::Value> = coco_eval::STAT_NAMES
            .iter()
            .zip(ev.stats)
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect();
        let cats: Vec<_> = ev
            .category_ids
            .iter()
            .zip(&per_cat)
            .map(|(id, ap)| json!({"id": id, "name": names[id], "ap": ap}))
            .collect();
        println!(
            "{}",
            json!({"gt": gt.display().to_string(), "dets": dets.display().to_string(),
                "images": data.images.len(), "annotations": data.annotations.len(),
                "detections": found.len(), "skipped_detections": ev.skipped_detections,
                "stats": stats, "per_category": cats})
        );
        return Ok(());
    }
    print!("{}", ev.summary());
    println!();
    println!("AP@[.5:.95] per category (-1: no ground truth)");
    for (id, ap) in ev.category_ids.iter().zip(&per_cat) {
        println!("  {:>4}  {:<24} {:>7.3}", id, names[id], ap);
    }
    if ev.skipped_detections > 0 {
        eprintln!(
            "note: {} detection(s) of categories not in {} were skipped, as pycocotools skips them",
            ev.skipped_detections,
            gt.display()
        );
    }
    Ok(())
}
