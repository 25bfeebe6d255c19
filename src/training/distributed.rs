//! Data-parallel training over several processes, one per GPU (or CPU
//! process), with torchrun's conventions: `RANK`, `WORLD_SIZE`,
//! `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT` ([`ProcessGroup::from_env`]),
//! set by `examples/launch.rs` or by any launcher (torchrun, Slurm, mpirun
//! wrappers) that sets them.
//!
//! The rendezvous is TCP: rank 0 listens on the master address, every other
//! rank connects (retrying until the timeout, so start order does not
//! matter) and says its rank, world size and device kind; rank 0 checks
//! them (a mismatched `WORLD_SIZE`, a duplicate rank or a CPU rank among
//! GPU ranks fail every rank with a message) and answers with the
//! collective to use. On CUDA that is NCCL (rank 0 makes the NCCL unique id
//! and sends it over the same sockets: the same code runs across hosts,
//! NCCL then talks over the network or NVLink by itself); elsewhere the
//! sums go through rank 0 over these sockets (a star, fine for LoRA
//! gradients, which are megabytes).
//!
//! Failures end every rank rather than hang it: a rank that exits closes
//! its socket, which its peers see (TCP collectives fail on the read; under
//! NCCL a watcher thread per socket aborts the communicator, and the
//! waiting rank fails instead of blocking in the kernel), and every wait is
//! bounded by the group's timeout (`METAL_CANDLE_DIST_TIMEOUT_S`, default
//! 600 s, like torch's NCCL timeout).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
#[cfg(all(feature = "cuda", unix))]
use std::sync::atomic::{AtomicBool, Ordering};
#[cfg(all(feature = "cuda", unix))]
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};

const MAGIC: &[u8; 4] = b"MCDP";
const VERSION: u32 = 1;
/// Sent by a rank that leaves after its last collective (not a failure).
const BYE: u8 = b'B';

/// Where and who this process is in a group of processes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupConfig {
    /// This process's rank, `0..world_size`; rank 0 writes checkpoints,
    /// metrics and the adapter.
    pub rank: usize,
    /// Processes in the group, on all hosts.
    pub world_size: usize,
    /// Rank on this host: which GPU this process uses.
    pub local_rank: usize,
    /// Rank 0's host (an address or name the others can reach).
    pub master_addr: String,
    /// Rank 0's rendezvous port.
    pub master_port: u16,
    /// How long a rank waits for the rendezvous or for a collective.
    pub timeout: Duration,
}

impl GroupConfig {
    /// torchrun's variables: `RANK`, `WORLD_SIZE`, `LOCAL_RANK` (default:
    /// `RANK`), `MASTER_ADDR` (default 127.0.0.1), `MASTER_PORT` (default
    /// 29500), plus `METAL_CANDLE_DIST_TIMEOUT_S` (default 600). `None`
    /// when `WORLD_SIZE` is not set (a single process).
    ///
    /// # Errors
    /// A variable that is set but not a number, or a rank outside the world.
    pub fn from_env() -> Result<Option<Self>> {
        fn var(name: &str) -> Option<String> {
            std::env::var(name).ok().filter(|v| !v.is_empty())
        }
        fn num<T: std::str::FromStr>(name: &str, v: &str) -> Result<T> {
            v.trim()
                .parse()
                .map_err(|_| Error::Distributed(format!("{name}={v:?} is not a number")))
        }
        let Some(world) = var("WORLD_SIZE") else {
            return Ok(None);
        };
        let world_size: usize = num("WORLD_SIZE", &world)?;
        let rank: usize = match var("RANK") {
            Some(r) => num("RANK", &r)?,
            None => {
                return Err(Error::Distributed(
                    "WORLD_SIZE is set but RANK is not (set both, as torchrun does)".into(),
                ))
            }
        };
        let local_rank = match var("LOCAL_RANK") {
            Some(r) => num("LOCAL_RANK", &r)?,
            None => rank,
        };
        let master_port = match var("MASTER_PORT") {
            Some(p) => num("MASTER_PORT", &p)?,
            None => 29500,
        };
        let timeout = match var("METAL_CANDLE_DIST_TIMEOUT_S") {
            Some(t) => Duration::from_secs_f64(num::<f64>("METAL_CANDLE_DIST_TIMEOUT_S", &t)?),
            None => Duration::from_secs(600),
        };
        let cfg = Self {
            rank,
            world_size,
            local_rank,
            master_addr: var("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into()),
            master_port,
            timeout,
        };
        cfg.validate()?;
        Ok(Some(cfg))
    }

    fn validate(&self) -> Result<()> {
        if self.world_size == 0 || self.rank >= self.world_size {
            return Err(Error::Distributed(format!(
                "rank {} is outside a world of {} processes",
                self.rank, self.world_size
            )));
        }
        if self.timeout.is_zero() {
            return Err(Error::Distributed("the timeout must be positive".into()));
        }
        Ok(())
    }
}

/// The processes training together and the collective they sum with.
pub struct ProcessGroup {
    rank: usize,
    world_size: usize,
    local_rank: usize,
    timeout: Duration,
    /// Rank 0: the socket of rank `r` at `r - 1`; other ranks: rank 0's.
    links: Vec<TcpStream>,
    collective: Collective,
}

enum Collective {
    /// Sums through rank 0 over the rendezvous sockets.
    Tcp,
    /// NCCL on the group's CUDA devices; the watchers abort it when a
    /// peer's socket closes. They hold it weakly: the communicator is
    /// destroyed when the group is dropped, on the dropping thread, not
    /// by a watcher racing the process's exit.
    #[cfg(all(feature = "cuda", unix))]
    Nccl {
        comm: Arc<crate::backend::nccl::NcclComm>,
        leaving: Arc<AtomicBool>,
    },
}

impl std::fmt::Debug for ProcessGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessGroup")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("local_rank", &self.local_rank)
            .field("collective", &self.backend_name())
            .finish_non_exhaustive()
    }
}

impl ProcessGroup {
    /// Joins the group described by the environment ([`GroupConfig::from_env`]);
    /// `None` for a single process. `device` is this process's device
    /// (`backend::cuda(local_rank)` on a GPU host).
    ///
    /// # Errors
    /// See [`Self::connect`].
    pub fn from_env(device: &Device) -> Result<Option<Self>> {
        match GroupConfig::from_env()? {
            Some(cfg) => Self::connect(&cfg, device).map(Some),
            None => Ok(None),
        }
    }

    /// Joins the group: the TCP rendezvous, then the collective (NCCL when
    /// `device` is CUDA, sums over TCP otherwise). Blocks until every rank
    /// has joined or the timeout passes.
    ///
    /// # Errors
    /// [`Error::Distributed`]: the timeout, a world size or device kind that
    /// differs between ranks, a duplicate rank, an unreachable or busy
    /// master address, NCCL missing or failing.
    pub fn connect(cfg: &GroupConfig, device: &Device) -> Result<Self> {
        cfg.validate()?;
        if cfg.world_size == 1 {
            // A group of one (WORLD_SIZE=1): nothing to meet or sum.
            return Ok(Self {
                rank: 0,
                world_size: 1,
                local_rank: cfg.local_rank,
                timeout: cfg.timeout,
                links: Vec::new(),
                collective: Collective::Tcp,
            });
        }
        let kind = if device.is_cuda() { b'c' } else { b'p' };
        let deadline = Instant::now() + cfg.timeout;
        let (links, payload) = if cfg.rank == 0 {
            let payload = match kind {
                b'c' => nccl_id()?,
                _ => Vec::new(),
            };
            (serve(cfg, kind, &payload, deadline)?, payload)
        } else {
            let (link, payload) = join(cfg, kind, deadline)?;
            (vec![link], payload)
        };
        for l in &links {
            l.set_read_timeout(Some(cfg.timeout))
                .and_then(|()| l.set_write_timeout(Some(cfg.timeout)))
                .and_then(|()| l.set_nodelay(true))
                .map_err(|e| io_error("configuring a rendezvous socket", e))?;
        }
        let collective = make_collective(cfg, device, &payload, &links)?;
        tracing::info!(
            rank = cfg.rank,
            world_size = cfg.world_size,
            "joined the process group ({})",
            if payload.is_empty() {
                "sums over TCP"
            } else {
                "NCCL"
            }
        );
        Ok(Self {
            rank: cfg.rank,
            world_size: cfg.world_size,
            local_rank: cfg.local_rank,
            timeout: cfg.timeout,
            links,
            collective,
        })
    }

    /// This process's rank.
    #[must_use]
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Processes in the group.
    #[must_use]
    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// Rank on this host (the GPU ordinal).
    #[must_use]
    pub fn local_rank(&self) -> usize {
        self.local_rank
    }

    /// Whether this is rank 0, the one that writes files.
    #[must_use]
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    fn backend_name(&self) -> &'static str {
        match self.collective {
            Collective::Tcp => "tcp",
            #[cfg(all(feature = "cuda", unix))]
            Collective::Nccl { .. } => "nccl",
        }
    }

    /// The element-wise sum of `t` (a 1-D f32 tensor of the same length on
    /// every rank) over all ranks, on `t`'s device. Every rank must call it,
    /// in the same order as the others.
    ///
    /// # Errors
    /// [`Error::Distributed`] when a rank left, timed out or sent another
    /// length; tensor errors.
    pub fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        if t.rank() != 1 || t.dtype() != candle_core::DType::F32 {
            return Err(Error::InvalidInput(format!(
                "all_reduce_sum takes a 1-D f32 tensor, got {:?} {:?}",
                t.dtype(),
                t.dims()
            )));
        }
        if self.world_size == 1 {
            return Ok(t.clone());
        }
        match &self.collective {
            Collective::Tcp => self.tcp_sum(t),
            #[cfg(all(feature = "cuda", unix))]
            Collective::Nccl { comm, .. } => comm.all_reduce_sum(&t.contiguous()?, self.timeout),
        }
    }

    /// Through rank 0: the others send, rank 0 adds in rank order (the
    /// same result on every run) and sends the sum back.
    fn tcp_sum(&self, t: &Tensor) -> Result<Tensor> {
        let mine: Vec<f32> = t.to_vec1()?;
        let n = mine.len();
        let sum = if self.rank == 0 {
            let mut sum = mine;
            for (i, link) in self.links.iter().enumerate() {
                let theirs = read_f32s(link, i + 1, self.timeout)?;
                if theirs.len() != n {
                    return Err(Error::Distributed(format!(
                        "rank {} sent {} values to sum, rank 0 has {n}",
                        i + 1,
                        theirs.len()
                    )));
                }
                sum.iter_mut().zip(&theirs).for_each(|(a, b)| *a += b);
            }
            for (i, link) in self.links.iter().enumerate() {
                write_f32s(link, &sum, i + 1)?;
            }
            sum
        } else {
            let link = &self.links[0];
            write_f32s(link, &mine, 0)?;
            let sum = read_f32s(link, 0, self.timeout)?;
            if sum.len() != n {
                return Err(Error::Distributed(format!(
                    "rank 0 sent a sum of {} values, this rank has {n}",
                    sum.len()
                )));
            }
            sum
        };
        Ok(Tensor::from_vec(sum, n, t.device())?)
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        #[cfg(all(feature = "cuda", unix))]
        if let Collective::Nccl { leaving, .. } = &self.collective {
            leaving.store(true, Ordering::SeqCst);
        }
        // Tell the peers this rank leaves on purpose, so their watchers do
        // not take it for a failure.
        for l in &self.links {
            let _ = (&*l).write_all(&[BYE]);
            let _ = l.shutdown(std::net::Shutdown::Write);
        }
    }
}

fn io_error(what: &str, e: std::io::Error) -> Error {
    Error::Distributed(format!("{what}: {e}"))
}

/// What a read from rank `peer` failing means, in words.
fn peer_error(peer: usize, timeout: Duration, e: &std::io::Error) -> Error {
    use std::io::ErrorKind;
    match e.kind() {
        ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset | ErrorKind::BrokenPipe => {
            Error::Distributed(format!(
                "rank {peer} closed its connection (it exited or failed; see its own error)"
            ))
        }
        ErrorKind::WouldBlock | ErrorKind::TimedOut => Error::Distributed(format!(
            "rank {peer} sent nothing for {:.0} s (timeout; METAL_CANDLE_DIST_TIMEOUT_S)",
            timeout.as_secs_f64()
        )),
        _ => Error::Distributed(format!("reading from rank {peer}: {e}")),
    }
}

fn write_f32s(link: &TcpStream, values: &[f32], peer: usize) -> Result<()> {
    let mut buf = Vec::with_capacity(8 + 4 * values.len());
    buf.extend_from_slice(&(values.len() as u64).to_le_bytes());
    for v in values {
        buf.extend_from_slice(&v.to_le_bytes());
    }
    let mut w = link;
    w.write_all(&buf)
        .map_err(|e| peer_error(peer, Duration::ZERO, &e))
}

fn read_f32s(link: &TcpStream, peer: usize, timeout: Duration) -> Result<Vec<f32>> {
    let mut r = link;
    let mut len = [0u8; 8];
    r.read_exact(&mut len)
        .map_err(|e| peer_error(peer, timeout, &e))?;
    let n = usize::try_from(u64::from_le_bytes(len))
        .map_err(|_| Error::Distributed(format!("rank {peer} sent a bad length")))?;
    if n > (1 << 30) {
        return Err(Error::Distributed(format!(
            "rank {peer} announced {n} values (not this protocol?)"
        )));
    }
    let mut bytes = vec![0u8; 4 * n];
    r.read_exact(&mut bytes)
        .map_err(|e| peer_error(peer, timeout, &e))?;
    Ok(bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// Rank 0's side: accept `world_size - 1` ranks, check them, answer each.
fn serve(cfg: &GroupConfig, kind: u8, payload: &[u8], deadline: Instant) -> Result<Vec<TcpStream>> {
    let addr = (cfg.master_addr.as_str(), cfg.master_port);
    let listener = TcpListener::bind(addr).map_err(|e| {
        io_error(
            &format!(
                "rank 0 listening on {}:{} (MASTER_ADDR/MASTER_PORT; is another run using the port?)",
                cfg.master_addr, cfg.master_port
            ),
            e,
        )
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|e| io_error("rendezvous listener", e))?;
    let mut links: Vec<Option<TcpStream>> = (1..cfg.world_size).map(|_| None).collect();
    let mut joined = 0;
    while joined < links.len() {
        match listener.accept() {
            Ok((stream, _)) => {
                stream
                    .set_nonblocking(false)
                    .and_then(|()| stream.set_read_timeout(Some(Duration::from_secs(30))))
                    .map_err(|e| io_error("rendezvous socket", e))?;
                let (rank, world, their_kind) = read_hello(&stream)?;
                let problem = if world != cfg.world_size {
                    Some(format!(
                        "rank {rank} has WORLD_SIZE={world}, rank 0 has {}",
                        cfg.world_size
                    ))
                } else if rank == 0 || rank >= cfg.world_size {
                    Some(format!("a process says it is rank {rank} of {world}"))
                } else if links[rank - 1].is_some() {
                    Some(format!("two processes say they are rank {rank}"))
                } else if their_kind != kind {
                    Some(format!(
                        "rank {rank} trains on {} but rank 0 on {}",
                        kind_name(their_kind),
                        kind_name(kind)
                    ))
                } else {
                    None
                };
                if let Some(p) = problem {
                    let _ = send_reply(&stream, Err(&p));
                    // Fail every rank that joined already, not only this one.
                    for l in links.iter().flatten() {
                        let _ = send_reply(l, Err(&p));
                    }
                    return Err(Error::Distributed(p));
                }
                links[rank - 1] = Some(stream);
                joined += 1;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    let missing: Vec<String> = links
                        .iter()
                        .enumerate()
                        .filter(|(_, l)| l.is_none())
                        .map(|(i, _)| (i + 1).to_string())
                        .collect();
                    let p = format!(
                        "rank(s) {} did not join within {:.0} s",
                        missing.join(", "),
                        cfg.timeout.as_secs_f64()
                    );
                    for l in links.iter().flatten() {
                        let _ = send_reply(l, Err(&p));
                    }
                    return Err(Error::Distributed(p));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(io_error("accepting a rank", e)),
        }
    }
    let links: Vec<TcpStream> = links.into_iter().flatten().collect();
    for l in &links {
        send_reply(l, Ok(payload))?;
    }
    Ok(links)
}

/// Another rank's side: connect to rank 0 (retrying until the deadline),
/// say who we are, read the answer (the collective's setup bytes).
fn join(cfg: &GroupConfig, kind: u8, deadline: Instant) -> Result<(TcpStream, Vec<u8>)> {
    let target = format!("{}:{}", cfg.master_addr, cfg.master_port);
    let stream = loop {
        let attempt = target
            .to_socket_addrs()
            .map_err(|e| io_error(&format!("resolving MASTER_ADDR {target}"), e))?
            .find_map(|a| TcpStream::connect_timeout(&a, Duration::from_secs(1)).ok());
        if let Some(s) = attempt {
            break s;
        }
        if Instant::now() > deadline {
            return Err(Error::Distributed(format!(
                "rank {} could not reach rank 0 at {target} within {:.0} s",
                cfg.rank,
                cfg.timeout.as_secs_f64()
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let remaining = deadline.saturating_duration_since(Instant::now());
    stream
        .set_read_timeout(Some(remaining.max(Duration::from_secs(1))))
        .map_err(|e| io_error("rendezvous socket", e))?;
    let mut hello = Vec::with_capacity(25);
    hello.extend_from_slice(MAGIC);
    hello.extend_from_slice(&VERSION.to_le_bytes());
    hello.extend_from_slice(&(cfg.rank as u64).to_le_bytes());
    hello.extend_from_slice(&(cfg.world_size as u64).to_le_bytes());
    hello.push(kind);
    (&stream)
        .write_all(&hello)
        .map_err(|e| io_error("sending the rendezvous hello", e))?;
    let payload = read_reply(&stream, cfg.timeout)?;
    Ok((stream, payload))
}

fn kind_name(kind: u8) -> &'static str {
    if kind == b'c' {
        "CUDA"
    } else {
        "the CPU"
    }
}

fn read_hello(stream: &TcpStream) -> Result<(usize, usize, u8)> {
    let mut buf = [0u8; 25];
    (&*stream)
        .read_exact(&mut buf)
        .map_err(|e| io_error("reading a rank's rendezvous hello", e))?;
    if &buf[..4] != MAGIC || buf[4..8] != VERSION.to_le_bytes() {
        return Err(Error::Distributed(
            "something that is not a metal-candle rank connected to the rendezvous port".into(),
        ));
    }
    let num = |b: &[u8]| {
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        usize::try_from(u64::from_le_bytes(a)).unwrap_or(usize::MAX)
    };
    Ok((num(&buf[8..16]), num(&buf[16..24]), buf[24]))
}

/// `Ok(payload)` or `Err(reason)`, as a status byte, a length and bytes.
fn send_reply(stream: &TcpStream, reply: std::result::Result<&[u8], &str>) -> Result<()> {
    let (status, body) = match reply {
        Ok(p) => (b'Y', p),
        Err(m) => (b'N', m.as_bytes()),
    };
    let mut buf = vec![status];
    buf.extend_from_slice(&(body.len() as u32).to_le_bytes());
    buf.extend_from_slice(body);
    (&*stream)
        .write_all(&buf)
        .map_err(|e| io_error("answering a rank", e))
}

fn read_reply(stream: &TcpStream, timeout: Duration) -> Result<Vec<u8>> {
    let mut head = [0u8; 5];
    (&*stream)
        .read_exact(&mut head)
        .map_err(|e| peer_error(0, timeout, &e))?;
    let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > 1 << 20 {
        return Err(Error::Distributed("rank 0 sent a malformed answer".into()));
    }
    let mut body = vec![0u8; len];
    (&*stream)
        .read_exact(&mut body)
        .map_err(|e| peer_error(0, timeout, &e))?;
    match head[0] {
        b'Y' => Ok(body),
        _ => Err(Error::Distributed(format!(
            "rank 0 refused the group: {}",
            String::from_utf8_lossy(&body)
        ))),
    }
}

#[cfg(all(feature = "cuda", unix))]
fn nccl_id() -> Result<Vec<u8>> {
    Ok(crate::backend::nccl::unique_id()?.0.to_vec())
}

#[cfg(not(all(feature = "cuda", unix)))]
fn nccl_id() -> Result<Vec<u8>> {
    Err(Error::Distributed(
        "CUDA data-parallel training needs the `cuda` feature on Linux (NCCL)".into(),
    ))
}

#[cfg(all(feature = "cuda", unix))]
fn make_collective(
    cfg: &GroupConfig,
    device: &Device,
    payload: &[u8],
    links: &[TcpStream],
) -> Result<Collective> {
    use crate::backend::nccl::{NcclComm, NcclId};
    let Device::Cuda(dev) = device else {
        return Ok(Collective::Tcp);
    };
    let id: [u8; 128] = payload
        .try_into()
        .map_err(|_| Error::Distributed("rank 0 sent a malformed NCCL id".into()))?;
    let comm = Arc::new(NcclComm::init(dev, &NcclId(id), cfg.rank, cfg.world_size)?);
    let leaving = Arc::new(AtomicBool::new(false));
    // One watcher per peer socket: EOF or an error before the peer said
    // goodbye (or before this rank leaves) means it died: abort NCCL so
    // this rank's pending or next collective fails instead of hanging.
    for (i, link) in links.iter().enumerate() {
        let peer = if cfg.rank == 0 { i + 1 } else { 0 };
        let mut watch = link
            .try_clone()
            .map_err(|e| io_error("watching a peer's socket", e))?;
        watch
            .set_read_timeout(None)
            .map_err(|e| io_error("watching a peer's socket", e))?;
        let (weak, leaving) = (Arc::downgrade(&comm), leaving.clone());
        std::thread::spawn(move || {
            let mut byte = [0u8; 1];
            let clean = matches!(watch.read(&mut byte), Ok(1) if byte[0] == BYE);
            if leaving.load(Ordering::SeqCst) {
                return;
            }
            let Some(comm) = weak.upgrade() else {
                return;
            };
            if clean {
                comm.peer_left(peer);
            } else {
                tracing::error!("rank {peer} left the process group: aborting NCCL");
                comm.abort();
            }
        });
    }
    Ok(Collective::Nccl { comm, leaving })
}

#[cfg(not(all(feature = "cuda", unix)))]
fn make_collective(_: &GroupConfig, _: &Device, _: &[u8], _: &[TcpStream]) -> Result<Collective> {
    Ok(Collective::Tcp)
}
