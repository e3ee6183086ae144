//! The `khub` command: argument parsing and output only; the work is in the library.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

/// khub: end-to-end encrypted sync relay and reference device.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write the published test vectors (pairing, envelopes, rekey) for checking
    /// another implementation against this one.
    Vectors {
        /// Directory to write the JSON files into (created if missing).
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Vectors { out } => {
            std::fs::create_dir_all(&out)
                .with_context(|| format!("cannot create {}", out.display()))?;
            for (name, text) in khub::vectors::generate() {
                let path = out.join(name);
                std::fs::write(&path, text)
                    .with_context(|| format!("cannot write {}", path.display()))?;
                println!("wrote {}", path.display());
            }
        }
    }
    Ok(())
}
