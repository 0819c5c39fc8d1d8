//! `normvision scenes`: garment scenes on disk, with a progress bar.

use normvision::data::fashion_mnist::{self, Split};
use normvision::data::scenes::SceneGenerator;
use normvision::io::scene_files::write_scenes;
use normvision::Result;
use std::path::Path;
use std::sync::Arc;

pub fn run(
    out: &Path,
    size: usize,
    count: u64,
    seed: u64,
    split: &str,
    data: Option<&Path>,
    quiet: bool,
) -> Result<()> {
    let sp = if split == "test" {
        Split::Test
    } else {
        Split::Train
    };
    let source = Arc::new(fashion_mnist::load(data, sp)?);
    let gen = SceneGenerator::new(source, size, seed)?;
    let bar = if quiet || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(count)
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix:>8} [{bar:28}] {pos}/{len} {per_sec} {eta}",
        )
        .expect("template")
        .progress_chars("=> "),
    );
    bar.set_prefix("scenes");
    let t = std::time::Instant::now();
    write_scenes(&gen, count, split, out, &mut |done, _| {
        bar.set_position(done)
    })?;
    bar.finish_and_clear();
    if !quiet {
        println!(
            "{count} scenes of {size}x{size} from the {split} split (seed {seed}) in {:.1} s: {}",
            t.elapsed().as_secs_f64(),
            out.display()
        );
    }
    Ok(())
}
