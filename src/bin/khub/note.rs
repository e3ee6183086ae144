//! `khub note …`: notes that sync, from a terminal or a script.
//!
//! Every command first catches up with the relay when it can reach it, and
//! works on this device's copy when it cannot (saying so on stderr); edits
//! are published at once when the relay answers, and otherwise go out with
//! the next sync.

use std::io::{IsTerminal, Read};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Subcommand;
use khub::client::{Device, SyncProgress};
use khub::notes::{Delivery, Note, NoteEdit, Vault};

use super::HomeArg;

/// How long a note command waits for the relay before working offline.
const SYNC_WAIT: Duration = Duration::from_secs(10);

#[derive(Subcommand)]
pub enum NoteCommand {
    /// Write a new note; its text is read from stdin.
    New {
        #[command(flatten)]
        home: HomeArg,
        /// Its title.
        #[arg(long, default_value = "")]
        title: String,
        /// Its tags, comma-separated.
        #[arg(long, value_delimiter = ',')]
        tags: Vec<String>,
    },
    /// Edit a note's text in $EDITOR (on a terminal) or replace it with
    /// stdin; only what changed is recorded, so edits made elsewhere meanwhile
    /// are kept.
    Edit {
        #[command(flatten)]
        home: HomeArg,
        /// The note's id (its first digits are enough).
        id: String,
        /// A new title (with --title or --tags and no stdin, the text is left).
        #[arg(long)]
        title: Option<String>,
        /// New tags, comma-separated (replacing the old ones).
        #[arg(long, value_delimiter = ',')]
        tags: Option<Vec<String>>,
    },
    /// Print a note: its title, tags, who edited it, whether edits made at
    /// once on several devices were merged into it, and its text.
    Show {
        #[command(flatten)]
        home: HomeArg,
        /// The note's id (its first digits are enough).
        id: String,
        /// One JSON object.
        #[arg(long)]
        json: bool,
    },
    /// List notes, most recently changed first.
    List {
        #[command(flatten)]
        home: HomeArg,
        /// One JSON object per line (text included).
        #[arg(long)]
        json: bool,
        /// Include deleted notes.
        #[arg(long)]
        deleted: bool,
    },
    /// Delete a note (`khub note restore` brings it back).
    Rm {
        #[command(flatten)]
        home: HomeArg,
        /// The note's id (its first digits are enough).
        id: String,
    },
    /// Bring a deleted note back.
    Restore {
        #[command(flatten)]
        home: HomeArg,
        /// The note's id (its first digits are enough).
        id: String,
    },
}

pub async fn run(command: NoteCommand) -> anyhow::Result<()> {
    match command {
        NoteCommand::New { home, title, tags } => {
            let device = Device::open(&home.path()?)?;
            let online = catch_up(&device).await;
            let body = read_stdin("Type the note; end it with Ctrl-D on a line of its own:")?;
            let vault = device.vault();
            let saved = vault.create(NoteEdit {
                title: Some(title),
                body: Some(body),
                tags: Some(tags),
            })?;
            println!("{}", saved.id);
            publish(&device, &vault, saved.id, online).await;
        }
        NoteCommand::Edit {
            home,
            id,
            title,
            tags,
        } => {
            let device = Device::open(&home.path()?)?;
            let online = catch_up(&device).await;
            let vault = device.vault();
            let id = vault.resolve(&id)?;
            let note = vault.get(id)?.context("the note is gone")?;
            let only_fields = title.is_some() || tags.is_some();
            let body = if std::io::stdin().is_terminal() {
                if only_fields {
                    None
                } else {
                    Some(edit_in_editor(&home.path()?, &note)?)
                }
            } else {
                let text = read_stdin("")?;
                (!(text.is_empty() && only_fields)).then_some(text)
            };
            let saved = vault.update_from(id, &note.version, NoteEdit { title, body, tags })?;
            if !saved.changed {
                eprintln!("nothing changed");
                return Ok(());
            }
            println!("{id}");
            publish(&device, &vault, id, online).await;
        }
        NoteCommand::Show { home, id, json } => {
            let device = Device::open(&home.path()?)?;
            catch_up(&device).await;
            let vault = device.vault();
            let id = vault.resolve(&id)?;
            let note = vault.get(id)?.context("the note is gone")?;
            if json {
                println!("{}", serde_json::to_string(&note)?);
                return Ok(());
            }
            let history = vault.history(id)?.context("the note is gone")?;
            let members = device.members()?;
            let name = |d: &khub::ids::DeviceId| {
                members
                    .iter()
                    .find(|m| m.id == *d)
                    .map_or_else(|| format!("{d} (no longer a member)"), |m| m.name.clone())
            };
            println!("title:   {}", note.title);
            for other in &note.other_titles {
                println!("         (also titled {other:?} on another device, at the same time)");
            }
            if !note.tags.is_empty() {
                println!("tags:    {}", note.tags.join(", "));
            }
            println!("id:      {}", note.id);
            println!("created: {}", when(note.created_ms));
            println!("updated: {}", when(note.updated_ms));
            let editors: Vec<String> = history.editors.iter().map(name).collect();
            println!(
                "edits:   {} by {}{}",
                history.changes,
                editors.join(", "),
                match history.merges {
                    0 => String::new(),
                    1 => "; merged 1 set of edits made at once on different devices".into(),
                    n => format!("; merged {n} sets of edits made at once on different devices"),
                }
            );
            if vault.delivery(id)? == Delivery::LocalOnly {
                println!("status:  saved on this device only (not yet on the relay)");
            }
            if note.deleted {
                println!(
                    "deleted: yes (`khub note restore {}` brings it back)",
                    short(&note)
                );
            }
            println!();
            print!("{}", note.body);
            if !note.body.is_empty() && !note.body.ends_with('\n') {
                println!();
            }
        }
        NoteCommand::List {
            home,
            json,
            deleted,
        } => {
            let device = Device::open(&home.path()?)?;
            catch_up(&device).await;
            let all = device.vault().list()?;
            let hidden = all.iter().filter(|n| !deleted && n.deleted).count();
            let notes: Vec<Note> = all.into_iter().filter(|n| deleted || !n.deleted).collect();
            if notes.is_empty() && !json {
                if hidden > 0 {
                    eprintln!(
                        "no notes but {hidden} deleted: `khub note list --deleted` shows them, `khub note restore ID` brings one back"
                    );
                } else {
                    eprintln!("no notes yet: `khub note new --title …` writes one");
                }
            }
            for note in notes {
                if json {
                    println!("{}", serde_json::to_string(&note)?);
                } else {
                    let title = if note.title.is_empty() {
                        note.body.lines().next().unwrap_or("").to_owned()
                    } else {
                        note.title.clone()
                    };
                    let tags = if note.tags.is_empty() {
                        String::new()
                    } else {
                        format!("  [{}]", note.tags.join(", "))
                    };
                    let gone = if note.deleted { "  (deleted)" } else { "" };
                    println!(
                        "{}  {}  {title}{tags}{gone}",
                        short(&note),
                        when(note.updated_ms)
                    );
                }
            }
        }
        NoteCommand::Rm { home, id } => set_deleted(&home, &id, true).await?,
        NoteCommand::Restore { home, id } => set_deleted(&home, &id, false).await?,
    }
    Ok(())
}

/// `note rm` (`deleted`) and `note restore`.
async fn set_deleted(home: &HomeArg, id: &str, deleted: bool) -> anyhow::Result<()> {
    let device = Device::open(&home.path()?)?;
    let online = catch_up(&device).await;
    let vault = device.vault();
    let id = vault.resolve(id)?;
    let saved = if deleted {
        vault.delete(id)?
    } else {
        vault.restore(id)?
    };
    if !saved.changed {
        eprintln!(
            "{}",
            if deleted {
                "already deleted"
            } else {
                "not deleted"
            }
        );
        return Ok(());
    }
    println!("{} {id}", if deleted { "deleted" } else { "restored" });
    publish(&device, &vault, id, online).await;
    Ok(())
}

/// The first 8 hex digits of a note's id: enough to name it in commands.
fn short(note: &Note) -> String {
    note.id.to_hex()[..8].to_owned()
}

/// A time in ms since the epoch, as UTC.
fn when(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rest = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02} UTC",
        rest / 3600,
        rest % 3600 / 60
    )
}

/// Syncs with the relay if it answers within [`SYNC_WAIT`] per page;
/// otherwise says that this device's copy is used. A long sync shows
/// progress on stderr. Returns whether the relay answered.
async fn catch_up(device: &Device) -> bool {
    let mut shown = false;
    let progress = |p: SyncProgress| {
        if p.remaining > 0 || shown {
            eprint!("\rsyncing: {} taken in, {} to go   ", p.taken, p.remaining);
            shown = true;
        }
    };
    let result = tokio::time::timeout(SYNC_WAIT * 30, device.sync_with_progress(progress)).await;
    if shown {
        eprintln!();
    }
    match result {
        Ok(Ok(_)) => true,
        Ok(Err(e)) if e.is_transient() => {
            eprintln!("offline: the relay did not answer ({e}); working on this device's copy");
            false
        }
        Ok(Err(e)) => {
            eprintln!("could not sync with the relay ({e}); working on this device's copy");
            false
        }
        Err(_) => {
            eprintln!("offline: the relay is too slow; working on this device's copy");
            false
        }
    }
}

/// Publishes an edit if the relay answered before, and says where it is.
async fn publish(device: &Device, vault: &Vault, id: khub::notes::NoteId, online: bool) {
    if online {
        let _ = tokio::time::timeout(SYNC_WAIT, device.sync()).await;
    }
    match vault.delivery(id) {
        Ok(Delivery::Acked) => eprintln!("saved and sent to the relay"),
        _ => eprintln!(
            "saved on this device; it goes out with the next `khub note`, `khub send` or `khub listen` that reaches the relay"
        ),
    }
}

/// Reads all of stdin as text, prompting on a terminal.
fn read_stdin(prompt: &str) -> anyhow::Result<String> {
    if std::io::stdin().is_terminal() && !prompt.is_empty() {
        eprintln!("{prompt}");
    }
    let mut text = String::new();
    std::io::stdin()
        .read_to_string(&mut text)
        .context("stdin is not UTF-8 text")?;
    Ok(text)
}

/// Opens the note's text in `$VISUAL`, `$EDITOR` or `vi`, in a file inside
/// the device's home (mode 0700), and returns what the editor saved.
fn edit_in_editor(home: &std::path::Path, note: &Note) -> anyhow::Result<String> {
    let path = home.join(format!("note-{}.txt", short(note)));
    std::fs::write(&path, &note.body)
        .with_context(|| format!("cannot write {}", path.display()))?;
    let editor = std::env::var("VISUAL")
        .or_else(|_| std::env::var("EDITOR"))
        .unwrap_or_else(|_| "vi".into());
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("{editor} \"$1\""))
        .arg("sh")
        .arg(&path)
        .status();
    let text = std::fs::read_to_string(&path);
    let _ = std::fs::remove_file(&path);
    let status = status.with_context(|| format!("cannot start the editor {editor:?}"))?;
    if !status.success() {
        bail!("the editor {editor:?} failed ({status}); the note was not changed");
    }
    text.with_context(|| format!("cannot read back {}", path.display()))
}
