//! Fuzz chain loading end to end: write up to three snapshot directories from the input, then
//! load the chain, verify it and restore it eagerly and lazily. Any outcome but a panic (or a
//! sanitizer report) is fine; nothing may be written outside the scratch directory.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use squib_fuzz::{MAX_MEMORY, NAMES, fix_header, parse};
use squib_snapshot::snapshot::format::MemoryTrailer;
use squib_snapshot::snapshot::restore::restore;
use squib_snapshot::snapshot::{Chain, MEMORY_FILE, RestoreMode, STATE_FILE, SnapshotState, verify};

fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("scratch dir").keep())
}

fuzz_target!(|data: &[u8]| {
    let Some(members) = parse(data) else { return };
    if members
        .iter()
        .any(|m| m.memory_len > MAX_MEMORY || m.data.len() > m.memory_len as usize)
    {
        return;
    }
    let root = scratch().join("chain");
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).expect("chain dir");
    for (m, name) in members.iter().zip(NAMES) {
        let dir = root.join(name);
        std::fs::create_dir(&dir).expect("member dir");
        // Valid headers, so mutations reach the body rules and the chain logic.
        let state = fix_header(m.state);
        std::fs::write(dir.join(STATE_FILE), &state).expect("state");
        let mem = dir.join(MEMORY_FILE);
        std::fs::write(&mem, m.data).expect("memory");
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&mem)
            .expect("memory");
        f.set_len(u64::from(m.memory_len)).expect("memory length");
        // A trailer naming the state's id where its layout ends (when the file is long enough),
        // so mutations of the state body get past the identity check to the extents.
        if let Ok(s) = SnapshotState::decode(&state)
            && s.memory_file_len() == u64::from(m.memory_len)
        {
            let t = MemoryTrailer {
                id: s.id,
                layout_bytes: s.layout_bytes(),
            };
            std::os::unix::fs::FileExt::write_all_at(&f, &t.encode(), s.layout_bytes()).expect("trailer");
        }
    }
    let leaf = root.join(NAMES[members.len() - 1]);
    if Chain::load(&leaf).is_ok() {
        let _ = verify(&leaf);
        let eager = restore(&leaf, RestoreMode::Eager);
        let lazy = restore(&leaf, RestoreMode::Lazy);
        // A chain that restores eagerly (every checksum matched) restores lazily too.
        assert!(
            eager.is_err() || lazy.is_ok(),
            "eager restore succeeded but lazy failed"
        );
    }
});
