//! Writing garment scenes ([`crate::data::scenes`]) to disk, in the layouts segmentation and detection tools read:
//!
//! ```text
//! DIR/images/000000.png     8-bit grayscale
//! DIR/masks/000000.png      indexed colour (Pascal VOC's palette): the palette index is the class id,
//!                           0 background, 1-10 the garments, 255 ignore
//! DIR/annotations.json      COCO: images, annotations (bbox = the visible extent, area = visible pixels,
//!                           iscrowd 0), categories 1-10
//! DIR/scenes.json           how they were made (size, count, seed, split, thresholds, class names)
//! ```
//!
//! Scenes are generated in parallel chunks and streamed to disk; the JSON files are written last, atomically,
//! so a directory with `annotations.json` is complete.

use crate::data::scenes::{Scene, SceneGenerator, EDGE, IGNORE, MIN_VISIBLE, VISIBLE};
use crate::{NvError, Result};
use rayon::prelude::*;
use serde_json::json;
use std::path::Path;

/// Pascal VOC's colour map: the colour of palette index `i` (its bits spread over R, G and B).
pub fn voc_palette() -> Vec<u8> {
    let mut pal = Vec::with_capacity(256 * 3);
    for i in 0..256u32 {
        let (mut r, mut g, mut b, mut c) = (0u8, 0u8, 0u8, i);
        for j in 0..8 {
            r |= ((c & 1) as u8) << (7 - j);
            g |= (((c >> 1) & 1) as u8) << (7 - j);
            b |= (((c >> 2) & 1) as u8) << (7 - j);
            c >>= 3;
        }
        pal.extend_from_slice(&[r, g, b]);
    }
    pal
}

fn png_err(path: &Path, e: impl std::fmt::Display) -> NvError {
    NvError::Format {
        path: path.display().to_string(),
        msg: format!("cannot encode PNG: {e}"),
    }
}

/// Encodes `pixels` (`w`×`h`, one byte each) as a PNG: grayscale, or indexed with `palette`.
pub fn encode_png(
    pixels: &[u8],
    w: usize,
    h: usize,
    palette: Option<&[u8]>,
    path: &Path,
) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, w as u32, h as u32);
        enc.set_depth(png::BitDepth::Eight);
        match palette {
            Some(p) => {
                enc.set_color(png::ColorType::Indexed);
                enc.set_palette(p.to_vec());
            }
            None => enc.set_color(png::ColorType::Grayscale),
        }
        let mut wr = enc.write_header().map_err(|e| png_err(path, e))?;
        wr.write_image_data(pixels).map_err(|e| png_err(path, e))?;
    }
    Ok(out)
}

/// The file stem of scene `i`.
pub fn stem(i: u64) -> String {
    format!("{i:06}")
}

/// Writes scenes `0..count` of `gen` under `dir` (see the module documentation); `split` names the source
/// split in `scenes.json`. `progress(done, count)` is called as chunks land.
pub fn write_scenes(
    gen: &SceneGenerator,
    count: u64,
    split: &str,
    dir: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    if count == 0 {
        return Err(NvError::Config("scenes: --count must be at least 1".into()));
    }
    let (images, masks) = (dir.join("images"), dir.join("masks"));
    for d in [&images, &masks] {
        std::fs::create_dir_all(d).map_err(|e| NvError::io(d, "create directory", e))?;
    }
    let n = gen.size();
    let palette = voc_palette();
    let (mut img_json, mut ann_json) = (vec![], vec![]);
    let mut next_ann = 1u64;
    const CHUNK: u64 = 64;
    let mut start = 0;
    while start < count {
        let end = (start + CHUNK).min(count);
        let scenes: Vec<Scene> = (start..end)
            .into_par_iter()
            .map(|i| {
                let s = gen.scene(i)?;
                let st = stem(i);
                let ip = images.join(format!("{st}.png"));
                let mp = masks.join(format!("{st}.png"));
                let ib = encode_png(&s.image, n, n, None, &ip)?;
                let mb = encode_png(&s.mask, n, n, Some(&palette), &mp)?;
                std::fs::write(&ip, ib).map_err(|e| NvError::io(&ip, "write", e))?;
                std::fs::write(&mp, mb).map_err(|e| NvError::io(&mp, "write", e))?;
                Ok(s)
            })
            .collect::<Result<_>>()?;
        for (k, s) in scenes.iter().enumerate() {
            let id = start + k as u64;
            img_json.push(json!({"id": id, "file_name": format!("{}.png", stem(id)), "width": n, "height": n}));
            for o in &s.objects {
                ann_json.push(
                    json!({"id": next_ann, "image_id": id, "category_id": o.class + 1,
                    "bbox": o.bbox, "area": o.area, "iscrowd": 0,
                    "visible_fraction": o.visible_fraction}),
                );
                next_ann += 1;
            }
        }
        start = end;
        progress(start, count);
    }
    let categories: Vec<_> = gen
        .classes()
        .iter()
        .enumerate()
        .map(|(k, name)| json!({"id": k + 1, "name": name, "supercategory": "garment"}))
        .collect();
    let coco = json!({"info": {"description": "normvision garment scenes", "seed": gen.seed(), "split": split},
        "images": img_json, "annotations": ann_json, "categories": categories});
    let meta = json!({"format": "normvision-scenes-1", "size": n, "count": count, "seed": gen.seed(),
        "source_split": split, "classes": std::iter::once("background".to_string())
            .chain(gen.classes().iter().cloned()).collect::<Vec<_>>(),
        "ignore_index": IGNORE, "visible_opacity": VISIBLE, "edge_opacity": EDGE,
        "min_visible_fraction": MIN_VISIBLE,
        "labels": "a pixel takes class + 1 of the top garment (the last drawn with opacity >= edge_opacity) where its opacity is >= visible_opacity, ignore_index on its edge, 0 elsewhere; opacity = pixel value / 255"});
    let pretty = |v: &serde_json::Value| serde_json::to_vec_pretty(v).expect("json serialises");
    super::write_atomic(&dir.join("scenes.json"), &pretty(&meta))?;
    super::write_atomic(&dir.join("annotations.json"), &pretty(&coco))?;
    Ok(())
}
