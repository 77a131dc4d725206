//! The `twinbd` command line: see `docs/` and the interface contract for every subcommand.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use twinbd::config::{Config, NodeConfig};
use twinbd::control::{Client, Request};

#[derive(Parser)]
#[command(
    name = "twinbd",
    version,
    about = "Block-device mirroring over NBD: a primary and a hot standby"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct NodeArgs {
    /// The resource file.
    #[arg(short, long)]
    config: PathBuf,
    /// Which node of the file this is (default: the node named as this machine's hostname).
    #[arg(short, long)]
    node: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Write fresh metadata for this node's disk.
    CreateMd {
        #[command(flatten)]
        node: NodeArgs,
        /// Overwrite valid metadata.
        #[arg(long)]
        force: bool,
    },
    /// Run the node's daemon in the foreground until SIGTERM/SIGINT.
    Run {
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Show the node's state.
    Status {
        #[command(flatten)]
        node: NodeArgs,
        /// Print the JSON object instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Stream state changes as JSON lines until interrupted.
    Events {
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Make this node primary.
    Promote {
        #[command(flatten)]
        node: NodeArgs,
        /// Promote even though the local disk is not known to be up to date, or the peer is
        /// connected and primary.
        #[arg(long)]
        force: bool,
    },
    /// Make this node secondary.
    Demote {
        #[command(flatten)]
        node: NodeArgs,
        /// Disconnect NBD clients that hold the export open.
        #[arg(long)]
        force: bool,
    },
    /// Re-establish the peer link.
    Connect {
        #[command(flatten)]
        node: NodeArgs,
        /// Resolve a split brain by making this node the sync target.
        #[arg(long)]
        discard_my_data: bool,
    },
    /// Drop the peer link.
    Disconnect {
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Compare block checksums with the peer online.
    Verify {
        #[command(flatten)]
        node: NodeArgs,
    },
    /// List a split-brain recovery file, or write its saved blocks back into a disk or image.
    Recovery {
        /// The recovery file (written beside the metadata of a node that lost a split brain).
        file: PathBuf,
        /// Write every saved block into this disk or image file (at its original offset).
        #[arg(long)]
        apply: Option<PathBuf>,
    },
    /// Run a demonstration on loopback, exported over NBD at 127.0.0.1:10809.
    Demo {
        /// Directory for the disk and metadata files (default: a new temporary directory).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Disk size, e.g. 256MiB, 1GiB.
        #[arg(long, default_value = "256MiB")]
        size: String,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    init_logging();
    match dispatch(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("twinbd: {msg}");
            ExitCode::FAILURE
        }
    }
}

/// `TWINBD_WORKER_THREADS`: the daemon's runtime threads. A value that is set but not a
/// positive number is refused rather than ignored.
///
/// The default is one thread per two CPUs, at least one. Every request also makes work for
/// threads that are not the runtime's: the kernel's io_uring workers copy large payloads,
/// the network stack's receive processing runs in the sender's context, and the client is
/// often on the same machine. With a runtime thread per CPU, the runtime's idle threads
/// are woken to steal the tasks a completion wakes, moving a session between threads
/// (each move a wake-up on another CPU) and competing with that kernel work: on 2 CPUs,
/// one runtime thread took 185 µs of CPU per 1 MiB write against 264 µs for two, and
/// 34 against 40 µs per 4 KiB write at queue depth 1 (`docs/benchmarks.md`).
fn worker_threads() -> Result<usize, String> {
    let default = || {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        (cpus / 2).max(1)
    };
    let Some(raw) = std::env::var_os("TWINBD_WORKER_THREADS") else {
        return Ok(default());
    };
    let v = raw.to_string_lossy();
    if v.is_empty() {
        return Ok(default());
    }
    match v.trim().parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!(
            "TWINBD_WORKER_THREADS={v:?} is not a positive number of threads"
        )),
    }
}

/// Help and version go out as clap writes them. A command line that does not parse, or has
/// no command, fails with exit status 2 and one line on stderr, like every other failure.
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => e.exit(),
        // `twinbd` alone: clap would print the whole help on stderr.
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            eprintln!("twinbd: a command is required (see `twinbd --help`)");
            return ExitCode::from(2);
        }
        _ => {}
    }
    eprintln!(
        "twinbd: {} (see `twinbd --help`)",
        one_line(&e.render().to_string())
    );
    ExitCode::from(2)
}

/// clap's message without its usage and hint paragraphs, on one line.
fn one_line(rendered: &str) -> String {
    let text: Vec<&str> = rendered
        .lines()
        .map(str::trim)
        .take_while(|l| !l.is_empty() && !l.starts_with("Usage:"))
        .collect();
    let joined = text.join(" ");
    joined
        .strip_prefix("error: ")
        .unwrap_or(&joined)
        .to_string()
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

fn load(args: &NodeArgs) -> Result<(Config, NodeConfig), String> {
    let cfg = Config::read(&args.config).map_err(|e| e.to_string())?;
    let node = cfg
        .node(args.node.as_deref())
        .map_err(|e| e.to_string())?
        .clone();
    Ok((cfg, node))
}

fn call(
    args: &NodeArgs,
    req: Request,
    timeout: Duration,
) -> Result<twinbd::control::Reply, String> {
    let (_, node) = load(args)?;
    let mut c = Client::connect(&node.admin).map_err(|e| e.to_string())?;
    c.call(&req, timeout).map_err(|e| e.to_string())
}

fn print_message(reply: twinbd::control::Reply) {
    if let Some(m) = reply.message {
        println!("{m}");
    }
}

fn dispatch(cmd: Command) -> Result<(), String> {
    // Role changes may wait for NBD clients to drain.
    let slow = Duration::from_secs(60);
    match cmd {
        Command::CreateMd { node, force } => {
            let (cfg, me) = load(&node)?;
            cfg.validate_node_paths(&me.name)
                .map_err(|e| e.to_string())?;
            let size = twinbd::node::create_md(&cfg, &me, force).map_err(|e| e.to_string())?;
            println!(
                "metadata written for node {} of resource {}: exported size {} bytes ({})",
                me.name,
                cfg.resource.name,
                size,
                twinbd::status::human_bytes(size)
            );
            Ok(())
        }
        Command::Run { node } => {
            let (cfg, me) = load(&node)?;
            twinbd::config::warn_if_world_readable(&node.config);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(worker_threads()?)
                .enable_all()
                .thread_name("twinbd")
                .build()
                .map_err(|e| format!("cannot start the runtime: {e}"))?;
            rt.block_on(twinbd::node::run(cfg, &me.name))
                .map_err(|e| e.to_string())
        }
        Command::Status { node, json } => {
            let reply = call(&node, Request::Status, Duration::from_secs(10))?;
            let st = reply.status.ok_or("daemon sent no status")?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&st).map_err(|e| e.to_string())?
                );
            } else {
                print!("{}", st.table());
            }
            Ok(())
        }
        Command::Events { node } => {
            let (_, me) = load(&node)?;
            let mut c = Client::connect(&me.admin).map_err(|e| e.to_string())?;
            c.send(&Request::Events).map_err(|e| e.to_string())?;
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            while let Some(line) = c.next_raw_line().map_err(|e| e.to_string())? {
                if out
                    .write_all(line.as_bytes())
                    .and_then(|_| out.flush())
                    .is_err()
                {
                    break;
                }
            }
            Ok(())
        }
        Command::Promote { node, force } => {
            print_message(call(&node, Request::Promote { force }, slow)?);
            Ok(())
        }
        Command::Demote { node, force } => {
            print_message(call(&node, Request::Demote { force }, slow)?);
            Ok(())
        }
        Command::Connect {
            node,
            discard_my_data,
        } => {
            print_message(call(&node, Request::Connect { discard_my_data }, slow)?);
            Ok(())
        }
        Command::Disconnect { node } => {
            print_message(call(&node, Request::Disconnect, slow)?);
            Ok(())
        }
        Command::Verify { node } => {
            print_message(call(
                &node,
                Request::Verify,
                Duration::from_secs(24 * 3600),
            )?);
            Ok(())
        }
        Command::Demo { dir, size } => twinbd::demo::run(dir, &size),
        Command::Recovery { file, apply } => {
            let c = twinbd::repl::recovery::read(&file).map_err(|e| e.to_string())?;
            let bytes: usize = c.records.iter().map(|r| r.data.len()).sum();
            println!(
                "recovery file of node {} (resource {}), device {} bytes, {} record(s), {} bytes saved{}",
                c.node,
                c.resource,
                c.size,
                c.records.len(),
                bytes,
                if c.torn_tail { " (a torn last record was ignored)" } else { "" }
            );
            match apply {
                None => {
                    for r in &c.records {
                        println!(
                            "{:>16} {:>10} crc32c {:08x}",
                            r.offset,
                            r.data.len(),
                            crc32c::crc32c(&r.data)
                        );
                    }
                }
                Some(target) => {
                    let n =
                        twinbd::repl::recovery::apply(&c, &target).map_err(|e| e.to_string())?;
                    println!("wrote {n} bytes back into {}", target.display());
                }
            }
            Ok(())
        }
    }
}
