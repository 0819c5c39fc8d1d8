//! Replays the fuzz corpora and every crash the fuzzer found (`fuzz/corpus/<target>/`, `fuzz/crashes/<target>/`)
//! through the same targets AFL++ ran (`normvision::internals::fuzz`), as plain tests, under an address-space limit
//! (RLIMIT_AS, as in the fuzz runs): an input that claims a huge tensor or image must be refused, not
//! allocated. The long fuzz runs are documented in docs/RELIABILITY.md; `bash fuzz/run.sh` reproduces them.

use std::path::Path;

/// The address-space limit of this test process: what a fuzzed input may make the parsers allocate, with room
/// for the test harness itself.
const AS_LIMIT: u64 = 3 << 30;

fn limit_address_space() {
    let lim = libc::rlimit {
        rlim_cur: AS_LIMIT,
        rlim_max: AS_LIMIT,
    };
    // SAFETY: setrlimit with a valid struct; lowering our own limit.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_AS, &lim) };
    assert_eq!(rc, 0, "setrlimit(RLIMIT_AS)");
}

fn replay(target: &str, f: fn(&[u8])) -> usize {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut n = 0;
    for kind in ["corpus", "crashes"] {
        let dir = root.join(kind).join(target);
        let Ok(rd) = std::fs::read_dir(&dir) else {
            assert!(
                kind == "crashes",
                "{}: the seed corpus is missing",
                dir.display()
            );
            continue;
        };
        let mut files: Vec<_> = rd
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        for p in files {
            let bytes = std::fs::read(&p).unwrap();
            let r = std::panic::catch_unwind(|| f(&bytes));
            assert!(r.is_ok(), "{target}: {} panicked", p.display());
            n += 1;
        }
    }
    n
}

#[test]
fn fuzz_corpora_and_crashes_replay_without_a_panic_or_an_abort() {
    limit_address_space();
    for (name, f) in normvision::internals::fuzz::TARGETS {
        let n = replay(name, f);
        assert!(n > 0, "{name}: empty corpus");
        eprintln!("{name}: {n} inputs replayed");
    }
}
