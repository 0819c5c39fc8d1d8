//! Crash safety, tested on the real binary: SIGKILL at seeded pseudo-random points and resume; a fault hook
//! that kills the process halfway through a checkpoint write; a full disk and a read-only output directory
//! (tmpfs inside `unshare -rm`); two runs writing one output. After each: the checkpoint on disk loads, the
//! resumed run completes, its final parameters are bitwise those of an uninterrupted run, and the JSON-lines
//! log holds every step once, with no cut line.

use crate::common;

use common::cli::*;
use normvision::state::StateTensor;
use normvision::train::checkpoint;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const EPOCHS: &str = "4";

fn train_args<'a>(data: &'a Path, out: &'a Path) -> Vec<&'a str> {
    vec![
        "train",
        "--data",
        s(data),
        "--model",
        "cnn",
        "--epochs",
        EPOCHS,
        "--batch-size",
        "16",
        "--lr",
        "0.05",
        "--quiet",
        "--out",
        s(out),
    ]
}

fn resume_args<'a>(data: &'a Path, out: &'a Path) -> Vec<&'a str> {
    vec![
        "train",
        "--data",
        s(data),
        "--resume",
        s(out),
        "--epochs",
        EPOCHS,
        "--quiet",
    ]
}

/// The model tensors of a checkpoint, as bits.
fn param_bits(ck: &Path) -> Vec<(String, Vec<u32>)> {
    let c = checkpoint::load(ck).unwrap_or_else(|e| panic!("{}: {e}", ck.display()));
    checkpoint::restore_model(&c).expect("restores");
    c.model_state
        .tensors
        .iter()
        .filter_map(|(k, t)| match t {
            StateTensor::F32(a) => Some((k.clone(), a.iter().map(|v| v.to_bits()).collect())),
            _ => None,
        })
        .collect()
}

/// Every step of the log once, in order 1..=n, and every line whole JSON.
fn check_log(log: &Path) -> usize {
    let text = std::fs::read_to_string(log).unwrap();
    assert!(text.ends_with('\n'), "log ends mid-line");
    let mut steps = vec![];
    for l in text.lines() {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("bad log line {l:?}: {e}"));
        if v["event"] == "step" {
            steps.push(v["step"].as_u64().unwrap());
        }
    }
    let want: Vec<u64> = (1..=steps.len() as u64).collect();
    assert_eq!(steps, want, "steps logged twice or missing");
    steps.len()
}

fn spawn(args: &[&str]) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_normvision"))
        .args(["--threads", "1"])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Runs to completion, resuming from the checkpoint when there is one.
fn finish(data: &Path, out: &Path) {
    let o = if out.is_file() {
        nv(&resume_args(data, out))
    } else {
        nv(&train_args(data, out))
    };
    assert_ok("resume after the kill", &o);
}

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    data: PathBuf,
    reference: Vec<(String, Vec<u32>)>,
    steps: usize,
    secs: f64,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let data = root.join("data");
    write_idx_dir(&data, 256, 40);
    let out = root.join("ref").join("model.safetensors");
    let t = Instant::now();
    assert_ok("uninterrupted run", &nv(&train_args(&data, &out)));
    let secs = t.elapsed().as_secs_f64();
    let steps = check_log(&out.with_extension("jsonl"));
    Fixture {
        reference: param_bits(&out),
        _dir: dir,
        root,
        data,
        steps,
        secs,
    }
}

#[test]
fn sigkill_at_seeded_points_then_resume_matches_the_uninterrupted_run() {
    let f = fixture();
    let mut rng = 0x9e3779b97f4a7c15u64;
    let (mut survived, mut after_checkpoint) = (0, 0);
    for k in 0..5 {
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let at = Duration::from_secs_f64(f.secs * ((rng >> 11) as f64 / (1u64 << 53) as f64));
        let out = f.root.join(format!("kill{k}")).join("model.safetensors");
        let mut child = spawn(&train_args(&f.data, &out));
        std::thread::sleep(at);
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        if out.is_file() {
            param_bits(&out); // whatever was on disk at the kill loads
            after_checkpoint += 1;
        }
        finish(&f.data, &out);
        assert_eq!(
            param_bits(&out),
            f.reference,
            "kill {k} at {at:?}: final parameters differ"
        );
        assert_eq!(
            check_log(&out.with_extension("jsonl")),
            f.steps,
            "kill {k}: log"
        );
        survived += 1;
    }
    eprintln!(
        "survived {survived} SIGKILLs, {after_checkpoint} of them after a checkpoint (uninterrupted run {:.2} s)",
        f.secs
    );
}

#[test]
fn a_kill_in_the_middle_of_a_checkpoint_write_loses_nothing() {
    let f = fixture();
    for n in ["1", "2", "3"] {
        let out = f.root.join(format!("fault{n}")).join("model.safetensors");
        let mut args = train_args(&f.data, &out);
        args.extend(["--fault-kill-in-write", n]);
        let o = nv(&args);
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            o.status.signal(),
            Some(9),
            "write {n}: the hook kills with SIGKILL: {o:?}"
        );
        let dir = out.parent().unwrap();
        let temps = normvision::io::atomic::stale_temps(&out).unwrap();
        assert_eq!(
            temps.len(),
            1,
            "write {n}: the half-written temporary file is there"
        );
        if n == "1" {
            assert!(
                !out.exists(),
                "no checkpoint before the first write completed"
            );
        } else {
            param_bits(&out); // the previous checkpoint loads
        }
        finish(&f.data, &out);
        assert!(
            normvision::io::atomic::stale_temps(&out)
                .unwrap()
                .is_empty(),
            "stale temp removed in {dir:?}"
        );
        assert_eq!(
            param_bits(&out),
            f.reference,
            "write {n}: final parameters differ"
        );
        assert_eq!(check_log(&out.with_extension("jsonl")), f.steps);
    }
}

#[test]
fn two_runs_on_one_output_are_refused_and_the_lock_survives_no_kill() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write_idx_dir(&data, 4000, 40);
    let out = dir.path().join("run").join("model.safetensors");
    let args = train_args(&data, &out);
    let mut first = spawn(&args);
    let lock = normvision::io::RunLock::path_for(&out);
    let t = Instant::now();
    while !lock.exists() && t.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    let o = nv(&args);
    assert_fails(
        "second run on the same output",
        &o,
        &["another normvision process", "model.safetensors"],
    );
    let _ = first.kill();
    let _ = first.wait();
    // The kill released the lock: the same output can be written again at once.
    normvision::io::RunLock::acquire(&out).expect("lock released by SIGKILL");
}

/// `unshare -rm` (a user and mount namespace) is how a test mounts a tmpfs without touching the host.
fn unshare_works() -> bool {
    Command::new("unshare")
        .args(["-rm", "true"])
        .status()
        .is_ok_and(|s| s.success())
}

fn in_namespace(script: &str) -> (bool, String) {
    let o = Command::new("unshare")
        .args(["-rm", "sh", "-c", script])
        .output()
        .unwrap();
    let text = format!("{}{}", stdout(&o), stderr(&o));
    (o.status.success(), text)
}

#[test]
fn a_full_disk_or_read_only_output_is_a_clear_error_and_keeps_the_last_checkpoint() {
    if !unshare_works() {
        eprintln!("skipped: `unshare -rm` is not permitted here");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let data = root.join("data");
    write_idx_dir(&data, 160, 40);
    let mnt = root.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let bin = env!("CARGO_BIN_EXE_normvision");
    // A checkpoint of this MLP is ~0.8 MB (weights and momentum): 1200 KiB hold one, not a second beside it.
    let train = format!(
        "{bin} --threads 1 train --data {} --model mlp --epochs 3 --batch-size 16 --quiet --out {}/model.safetensors --log {}/log.jsonl",
        s(&data), s(&mnt), s(root)
    );
    let eval = format!(
        "{bin} --threads 1 eval --checkpoint {}/model.safetensors --data {}",
        s(&mnt),
        s(&data)
    );
    let script = format!(
        "mount -t tmpfs -o size=1200k tmpfs {m} || exit 90; {train}; echo \"train-rc=$?\"; echo ls:; ls -a {m}; echo :ls; {eval} && echo eval-ok",
        m = s(&mnt)
    );
    let (_, text) = in_namespace(&script);
    assert!(
        text.contains("train-rc=1"),
        "full disk: train must fail:\n{text}"
    );
    assert!(
        text.contains("model.safetensors") && text.contains("No space left"),
        "error names the file:\n{text}"
    );
    let listing = &text[text.find("ls:").unwrap()..text.find(":ls").unwrap()];
    assert!(
        !listing.contains(".tmp"),
        "temporary file left on the full disk:\n{text}"
    );
    assert!(
        text.contains("eval-ok"),
        "the last good checkpoint must load:\n{text}"
    );
    assert!(!text.contains("panicked"), "{text}");

    // Read-only: refused before any training, naming the path; a checkpoint already there stays intact.
    let script = format!(
        "mount -t tmpfs tmpfs {m} || exit 90; {bin} --threads 1 train --data {d} --model mlp --epochs 1 --batch-size 16 --quiet --out {m}/model.safetensors || exit 91; \
         mount -o remount,ro {m} || exit 92; echo resume:; {bin} --threads 1 train --data {d} --resume {m}/model.safetensors --epochs 2 --quiet; echo \"resume-rc=$?\"; {eval} && echo eval-ok",
        m = s(&mnt), d = s(&data)
    );
    let (_, text) = in_namespace(&script);
    assert!(
        text.contains("resume-rc=1"),
        "read-only: must fail:\n{text}"
    );
    assert!(
        text.contains("Read-only file system") && text.contains(s(&mnt)),
        "error names the path:\n{text}"
    );
    let resumed = &text[text.find("resume:").unwrap()..text.find("resume-rc").unwrap()];
    assert!(
        !resumed.contains("steps"),
        "it failed before training:\n{text}"
    );
    assert!(
        text.contains("eval-ok"),
        "the checkpoint stays intact:\n{text}"
    );
}
