//! Starts one process per GPU for data-parallel training, as `torchrun`
//! does: each child gets `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`
//! and `MASTER_PORT` (read by `ProcessGroup::from_env` /
//! `GroupConfig::from_env`), plus NVLink multicast turned off in NCCL
//! (`NCCL_NVLS_ENABLE=0`, `TORCH_SYMM_MEM_DISABLE_MULTICAST=1`,
//! `NVSHMEM_DISABLE_NVLS=1`; a variable already set is kept).
//!
//! ```text
//! cargo run --release --features cuda --example launch -- --nproc-per-node 2 -- \
//!     target/release/examples/train_lora --device cuda --batch-size 4
//! ```
//!
//! Several hosts: run it on each with `--nnodes`, `--node-rank` and rank 0's
//! host as `--master-addr`. When a child fails, the others on this host are
//! stopped (theirs end by the group's own error handling) and the launcher
//! exits with the failed child's status.

use std::process::{Child, Command, ExitCode};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(about = "Start one training process per GPU (torchrun's conventions)")]
struct Args {
    /// Processes (GPUs) on this host.
    #[arg(long, default_value_t = 1)]
    nproc_per_node: usize,
    /// Hosts taking part.
    #[arg(long, default_value_t = 1)]
    nnodes: usize,
    /// This host's index, 0..nnodes (host 0 runs rank 0).
    #[arg(long, default_value_t = 0)]
    node_rank: usize,
    /// Rank 0's host, reachable from every host.
    #[arg(long, default_value = "127.0.0.1")]
    master_addr: String,
    /// Rank 0's rendezvous port (default: a free port on a single host,
    /// 29500 across hosts).
    #[arg(long)]
    master_port: Option<u16>,
    /// The program and its arguments (after `--`).
    #[arg(trailing_var_arg = true, required = true)]
    command: Vec<String>,
}

fn main() -> Result<ExitCode> {
    let args = Args::parse();
    if args.nproc_per_node == 0 || args.nnodes == 0 || args.node_rank >= args.nnodes {
        bail!("need --nproc-per-node >= 1 and --node-rank < --nnodes");
    }
    let port = match args.master_port {
        Some(p) => p,
        None if args.nnodes == 1 => std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port(),
        None => 29500,
    };
    let world = args.nproc_per_node * args.nnodes;
    let (program, rest) = args.command.split_first().context("no program to run")?;
    let mut children: Vec<(usize, Child)> = Vec::new();
    for local in 0..args.nproc_per_node {
        let rank = args.node_rank * args.nproc_per_node + local;
        let mut cmd = Command::new(program);
        cmd.args(rest)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("LOCAL_RANK", local.to_string())
            .env("LOCAL_WORLD_SIZE", args.nproc_per_node.to_string())
            .env("MASTER_ADDR", &args.master_addr)
            .env("MASTER_PORT", port.to_string());
        for (k, v) in [
            ("NCCL_NVLS_ENABLE", "0"),
            ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
            ("NVSHMEM_DISABLE_NVLS", "1"),
        ] {
            if std::env::var_os(k).is_none() {
                cmd.env(k, v);
            }
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting rank {rank}: {program}"))?;
        children.push((rank, child));
    }
    // Wait for all; on the first failure stop the rest.
    let mut status = ExitCode::SUCCESS;
    let mut failed = false;
    while !children.is_empty() {
        let mut i = 0;
        while i < children.len() {
            let (rank, child) = &mut children[i];
            match child.try_wait()? {
                Some(s) => {
                    if !s.success() && !failed {
                        failed = true;
                        eprintln!("launch: rank {rank} exited with {s}; stopping the others");
                        status = ExitCode::from(u8::try_from(s.code().unwrap_or(1)).unwrap_or(1));
                        for (_, other) in children.iter_mut() {
                            let _ = other.kill();
                        }
                    }
                    children.swap_remove(i);
                }
                None => i += 1,
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(status)
}
