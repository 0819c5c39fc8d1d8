//! Garment scenes (`normvision scenes`, `normvision::data::scenes`): the same seed gives the same bytes; masks,
//! boxes and areas agree with how each scene was composed; the files decode to the scenes (indexed masks with
//! Pascal VOC's palette, COCO annotations); bad settings are clear errors.

use normvision::data::scenes::{SceneGenerator, IGNORE, MIN_VISIBLE};
use normvision::io::scene_files::{voc_palette, write_scenes};
use std::path::Path;
use std::sync::Arc;

use crate::common;
use common::cli::synthetic;

fn generator(seed: u64) -> SceneGenerator {
    SceneGenerator::new(Arc::new(synthetic(300, 5)), 64, seed).unwrap()
}

fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = vec![];
    for sub in ["images", "masks"] {
        let mut names: Vec<_> = std::fs::read_dir(dir.join(sub))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        names.sort();
        for p in names {
            out.push((p.display().to_string(), std::fs::read(&p).unwrap()));
        }
    }
    for f in ["annotations.json", "scenes.json"] {
        out.push((f.into(), std::fs::read(dir.join(f)).unwrap()));
    }
    out
}

#[test]
fn the_same_seed_gives_the_same_bytes() {
    let t = tempfile::tempdir().unwrap();
    let (a, b, c) = (t.path().join("a"), t.path().join("b"), t.path().join("c"));
    write_scenes(&generator(3), 40, "train", &a, &mut |_, _| {}).unwrap();
    write_scenes(&generator(3), 40, "train", &b, &mut |_, _| {}).unwrap();
    write_scenes(&generator(4), 40, "train", &c, &mut |_, _| {}).unwrap();
    let (fa, fb, fc) = (files(&a), files(&b), files(&c));
    assert_eq!(fa.len(), 2 * 40 + 2);
    for (x, y) in fa.iter().zip(&fb) {
        assert_eq!(x.1, y.1, "{} differs between two runs of one seed", x.0);
    }
    let same = fa.iter().zip(&fc).filter(|(x, y)| x.1 == y.1).count();
    assert!(
        same < 4,
        "another seed gives other scenes ({same} files equal)"
    );
}

#[test]
fn masks_boxes_and_areas_agree_with_the_composition() {
    let g = generator(11);
    let n = g.size();
    let mut objects = 0;
    let mut hidden = 0;
    for i in 0..120 {
        let s = g.scene(i).unwrap();
        assert_eq!((s.image.len(), s.mask.len()), (n * n, n * n));
        assert!((1..=4).contains(&s.garments.len()));
        for p in 0..n * n {
            let (y, x) = (p / n, p % n);
            // a pixel no garment's square covers is background
            let inside = s.garments.iter().any(|&(.., left, top, side)| {
                (left..left + side).contains(&x) && (top..top + side).contains(&y)
            });
            if !inside {
                assert_eq!(
                    s.mask[p], 0,
                    "scene {i}: pixel ({x}, {y}) outside every garment"
                );
            }
            match s.owner[p] {
                Some(o) => {
                    let (.., left, top, side) = s.garments[o as usize];
                    assert!((left..left + side).contains(&x) && (top..top + side).contains(&y));
                    assert_eq!(s.mask[p] as usize, s.garments[o as usize].1 + 1);
                    // visible ink (opacity >= 0.5) over anything: at least half of its value of >= 127.5
                    assert!(
                        s.image[p] >= 63,
                        "scene {i}: ink pixel ({x}, {y}) is {}",
                        s.image[p]
                    );
                }
                None => assert!(s.mask[p] == 0 || s.mask[p] == IGNORE),
            }
        }
        let mut listed = vec![false; s.garments.len()];
        for o in &s.objects {
            listed[o.garment] = true;
            let px: Vec<usize> = (0..n * n)
                .filter(|&p| s.owner[p] == Some(o.garment as u8))
                .collect();
            assert_eq!(
                o.area,
                px.len(),
                "scene {i}: area is the visible pixel count"
            );
            let xs = px.iter().map(|p| p % n);
            let ys = px.iter().map(|p| p / n);
            let (x0, x1) = (xs.clone().min().unwrap(), xs.max().unwrap());
            let (y0, y1) = (ys.clone().min().unwrap(), ys.max().unwrap());
            assert_eq!(
                o.bbox,
                [x0, y0, x1 - x0 + 1, y1 - y0 + 1],
                "scene {i}: the visible extent"
            );
            assert!(o.visible_fraction >= MIN_VISIBLE);
            assert_eq!(o.class, s.garments[o.garment].1);
            objects += 1;
        }
        hidden += listed.iter().filter(|l| !**l).count();
    }
    assert!(objects > 150, "{objects} objects in 120 scenes");
    assert!(
        hidden > 0,
        "some garment in 120 scenes is hidden beyond 75%"
    );
}

#[test]
fn the_files_are_the_scenes() {
    let t = tempfile::tempdir().unwrap();
    let g = generator(2);
    write_scenes(&g, 10, "test", t.path(), &mut |_, _| {}).unwrap();
    let coco: serde_json::Value =
        serde_json::from_slice(&std::fs::read(t.path().join("annotations.json")).unwrap()).unwrap();
    assert_eq!(coco["images"].as_array().unwrap().len(), 10);
    assert_eq!(coco["categories"].as_array().unwrap().len(), 10);
    let pal = voc_palette();
    assert_eq!(&pal[3..6], &[128, 0, 0], "VOC: class 1 is dark red");
    assert_eq!(
        &pal[255 * 3..],
        &[224, 224, 192],
        "VOC: 255 (ignore) is cream"
    );
    let mut ann = coco["annotations"].as_array().unwrap().iter();
    for i in 0..10u64 {
        let s = g.scene(i).unwrap();
        let dec = |sub: &str| {
            let f = std::fs::File::open(t.path().join(sub).join(format!("{i:06}.png"))).unwrap();
            let mut r = png::Decoder::new(std::io::BufReader::new(f))
                .read_info()
                .unwrap();
            let mut buf = vec![0; r.output_buffer_size().unwrap()];
            let info = r.next_frame(&mut buf).unwrap();
            let palette = r.info().palette.as_ref().map(|p| p.to_vec());
            (info.color_type, buf[..info.buffer_size()].to_vec(), palette)
        };
        let (ct, img, _) = dec("images");
        assert_eq!((ct, img), (png::ColorType::Grayscale, s.image.clone()));
        let (ct, mask, palette) = dec("masks");
        assert_eq!((ct, mask), (png::ColorType::Indexed, s.mask.clone()));
        assert_eq!(palette.unwrap(), pal);
        for o in &s.objects {
            let a = ann.next().unwrap();
            assert_eq!(a["image_id"], i);
            assert_eq!(a["category_id"], o.class + 1);
            assert_eq!(a["area"], o.area);
            assert_eq!(a["bbox"], serde_json::json!(o.bbox));
        }
    }
    assert!(ann.next().is_none());
}

#[test]
fn bad_settings_are_clear_errors() {
    let src = Arc::new(synthetic(10, 1));
    let e = SceneGenerator::new(src.clone(), 30, 0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--size") && e.contains("42"), "{e}");
    let t = tempfile::tempdir().unwrap();
    let e = write_scenes(&generator(0), 0, "train", t.path(), &mut |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("--count"), "{e}");
    let rgb = normvision::data::Dataset::new(
        vec![0; 3 * 28 * 28],
        vec![0],
        vec!["a".into()],
        [3, 28, 28],
    )
    .unwrap();
    let e = SceneGenerator::new(Arc::new(rgb), 64, 0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("grayscale"), "{e}");
}

#[test]
fn the_cli_writes_scenes_from_idx_files() {
    use common::cli::{assert_fails, assert_ok, nv, s, write_idx_dir};
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("idx");
    write_idx_dir(&data, 50, 20);
    let out = t.path().join("scenes");
    let args = [
        "scenes",
        "--data",
        s(&data),
        "--out",
        s(&out),
        "--count",
        "12",
        "--split",
        "test",
        "-q",
    ];
    assert_ok("scenes", &nv(&args));
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("scenes.json")).unwrap()).unwrap();
    assert_eq!(meta["count"], 12);
    assert_eq!(meta["source_split"], "test");
    assert_eq!(std::fs::read_dir(out.join("masks")).unwrap().count(), 12);
    assert_fails(
        "a canvas too small",
        &nv(&[
            "scenes",
            "--data",
            s(&data),
            "--out",
            s(&out),
            "--size",
            "32",
        ]),
        &["--size"],
    );
}
