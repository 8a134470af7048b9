//! Man pages and shell completions, generated from the clap definitions by the binary
//! itself, so that what is shipped describes the very binary beside it.
//!
//! `qiod --generate-assets DIR` (the only argument) is a packaging hook that
//! `dist/build-deb.sh` calls. It is kept out of the clap definitions, or the pages and
//! completions it writes would list it. The output carries no date, path or user, so the
//! same binary always writes the same files.

use anyhow::Context;
use clap_complete::Shell;
use std::path::{Path, PathBuf};

/// The folder to write into, when the command line is exactly `--generate-assets DIR`.
pub fn requested() -> Option<PathBuf> {
    let mut args = std::env::args_os().skip(1);
    match (args.next(), args.next(), args.next()) {
        (Some(flag), Some(dir), None) if flag == "--generate-assets" => Some(dir.into()),
        _ => None,
    }
}

/// Writes `DIR/man/NAME.1` (and a page per subcommand) and `DIR/completions/` for bash,
/// zsh and fish.
pub fn write(mut cmd: clap::Command, dir: &Path) -> anyhow::Result<()> {
    let name = cmd.get_name().to_owned();
    let man = dir.join("man");
    let completions = dir.join("completions");
    for d in [&man, &completions] {
        std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    clap_mangen::generate_to(cmd.clone(), &man)
        .with_context(|| format!("cannot write the man pages into {}", man.display()))?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut cmd, &name, &completions).with_context(|| {
            format!(
                "cannot write the {shell} completions into {}",
                completions.display()
            )
        })?;
    }
    Ok(())
}
