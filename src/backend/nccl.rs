//! NCCL, for the gradient all-reduce of data-parallel training (one process
//! per GPU). Opened with `dlopen` on first use, not linked, so `--features
//! cuda` builds and runs without NCCL; only multi-process training needs it.
//! An all-reduce is awaited by polling an event, with a timeout, NCCL's
//! asynchronous error and an abort flag checked in between, so a rank that
//! died cannot hang the others.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::atomic::{fence, AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut};
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{CudaStorage, DType, Device, Storage, Tensor};

use crate::error::{Error, Result};

/// `ncclUniqueId`, passed by value to `ncclCommInitRank`.
#[repr(C)]
#[derive(Clone, Copy)]
struct UniqueId {
    internal: [c_char; 128],
}

type Comm = *mut c_void;
type GetUniqueIdFn = unsafe extern "C" fn(*mut UniqueId) -> c_int;
type CommInitRankFn = unsafe extern "C" fn(*mut Comm, c_int, UniqueId, c_int) -> c_int;
type AllReduceFn = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    c_int,
    c_int,
    Comm,
    *mut c_void,
) -> c_int;
type CommFn = unsafe extern "C" fn(Comm) -> c_int;
type GetAsyncErrorFn = unsafe extern "C" fn(Comm, *mut c_int) -> c_int;
type ErrorStringFn = unsafe extern "C" fn(c_int) -> *const c_char;

const NCCL_SUCCESS: c_int = 0;
const NCCL_IN_PROGRESS: c_int = 7;
const NCCL_FLOAT32: c_int = 7;
const NCCL_SUM: c_int = 0;
/// Polling spins (yielding) this long before sleeping: a LoRA gradient
/// all-reduce usually ends within it, and sleeps cost ~50-100 µs each.
const SPIN: Duration = Duration::from_millis(1);
const POLL: Duration = Duration::from_micros(50);
/// How long a sum waits on after a peer left on purpose: a rank that
/// finished its last sum and left can be seen leaving before this rank's
/// copy of that sum completes (its last bytes already sent).
const LEFT_GRACE: Duration = Duration::from_secs(2);

/// The entry points of the loaded library. The handle is never closed, so
/// the pointers stay valid for the life of the process.
struct Lib {
    get_unique_id: GetUniqueIdFn,
    init_rank: CommInitRankFn,
    all_reduce: AllReduceFn,
    abort: CommFn,
    destroy: CommFn,
    async_error: GetAsyncErrorFn,
    error_string: ErrorStringFn,
}

static LIB: OnceLock<std::result::Result<Lib, String>> = OnceLock::new();

/// The library, loaded on first use (a failure is remembered and reported again).
fn lib() -> Result<&'static Lib> {
    LIB.get_or_init(load)
        .as_ref()
        .map_err(|e| Error::Distributed(e.clone()))
}

/// A C string from a library (null: `none`), copied.
fn c_string(p: *const c_char, none: &str) -> String {
    if p.is_null() {
        return none.into();
    }
    // SAFETY: callers pass a NUL-terminated string that is live for this call.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

fn dlerror() -> String {
    // SAFETY: returns null or a string valid until the next dl* call on this thread.
    c_string(unsafe { libc::dlerror() }, "unknown dlopen error")
}

fn load() -> std::result::Result<Lib, String> {
    let mut tried = Vec::new();
    let mut handle = std::ptr::null_mut();
    for name in [c"libnccl.so.2", c"libnccl.so"] {
        // SAFETY: a NUL-terminated library name; loading runs NCCL's own initialisers.
        handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if !handle.is_null() {
            break;
        }
        tried.push(dlerror());
    }
    if handle.is_null() {
        return Err(format!(
            "NCCL was not found ({}). Multi-GPU training needs NCCL: install it (the \
             system's libnccl2 package, or the `nvidia-nccl-cu12` / `nvidia-nccl-cu13` pip \
             wheel) and add the folder holding libnccl.so.2 (for the wheel, \
             site-packages/nvidia/nccl/lib) to LD_LIBRARY_PATH",
            tried.join("; ")
        ));
    }
    macro_rules! sym {
        ($name:literal, $ty:ty) => {{
            // SAFETY: a live handle and a NUL-terminated symbol name.
            let p = unsafe { libc::dlsym(handle, $name.as_ptr()) };
            if p.is_null() {
                return Err(format!("libnccl has no symbol {:?}: {}", $name, dlerror()));
            }
            // SAFETY: the symbol is NCCL's function of this C signature (nccl.h);
            // data and function pointers have the same size on unix.
            unsafe { std::mem::transmute::<*mut c_void, $ty>(p) }
        }};
    }
    Ok(Lib {
        get_unique_id: sym!(c"ncclGetUniqueId", GetUniqueIdFn),
        init_rank: sym!(c"ncclCommInitRank", CommInitRankFn),
        all_reduce: sym!(c"ncclAllReduce", AllReduceFn),
        abort: sym!(c"ncclCommAbort", CommFn),
        destroy: sym!(c"ncclCommDestroy", CommFn),
        async_error: sym!(c"ncclCommGetAsyncError", GetAsyncErrorFn),
        error_string: sym!(c"ncclGetErrorString", ErrorStringFn),
    })
}

impl Lib {
    fn message(&self, code: c_int) -> String {
        // SAFETY: ncclGetErrorString takes any code and returns a static string.
        let s = c_string(unsafe { (self.error_string)(code) }, "unknown");
        format!("{s} (NCCL error {code})")
    }

    /// `Ok` for success (and in-progress, which only non-blocking comms return).
    fn check(&self, code: c_int, what: &str) -> Result<()> {
        if code == NCCL_SUCCESS || code == NCCL_IN_PROGRESS {
            return Ok(());
        }
        Err(Error::Distributed(format!(
            "{what} failed: {}",
            self.message(code)
        )))
    }
}

/// 128 opaque bytes made by rank 0 and sent to the others (by the TCP rendezvous).
pub(crate) struct NcclId(pub(crate) [u8; 128]);

/// A new NCCL unique id (rank 0 only; it opens NCCL's bootstrap listener).
pub(crate) fn unique_id() -> Result<NcclId> {
    let lib = lib()?;
    let mut id = UniqueId { internal: [0; 128] };
    // SAFETY: writes the 128 bytes of a live ncclUniqueId.
    lib.check(unsafe { (lib.get_unique_id)(&mut id) }, "ncclGetUniqueId")?;
    Ok(NcclId(id.internal.map(|c| c.to_ne_bytes()[0])))
}

/// One rank's NCCL communicator on one CUDA device.
///
/// NCCL allows one thread at a time on a communicator, so every call on it
/// holds `comm`'s lock; `None` once aborted. [`NcclComm::abort`] from another
/// thread aborts at once when the lock is free, else sets the flag that the
/// thread inside [`NcclComm::all_reduce_sum`] acts on at its next poll.
pub(crate) struct NcclComm {
    lib: &'static Lib,
    comm: Mutex<Option<Comm>>,
    aborted: AtomicBool,
    /// A peer that said goodbye (`rank + 1`; 0: none): a sum started after
    /// it left would wait forever.
    left: AtomicUsize,
    device: CudaDevice,
    rank: usize,
}

// SAFETY: the raw communicator is used only under the `comm` lock, so one
// thread at a time issues NCCL calls on it (NCCL's thread-safety rule), and
// ncclCommAbort may come from any thread; the rest is Send + Sync already.
unsafe impl Send for NcclComm {}
// SAFETY: as for Send.
unsafe impl Sync for NcclComm {}

impl NcclComm {
    /// `ncclCommInitRank` on `device` for `rank` of `world` (blocks until all
    /// ranks have joined).
    pub(crate) fn init(
        device: &CudaDevice,
        id: &NcclId,
        rank: usize,
        world: usize,
    ) -> Result<Self> {
        let lib = lib()?;
        let bad = || Error::Distributed(format!("rank {rank} of world {world} is out of range"));
        if rank >= world {
            return Err(bad());
        }
        let nranks = c_int::try_from(world).map_err(|_| bad())?;
        let r = c_int::try_from(rank).map_err(|_| bad())?;
        device.cuda_stream().context().bind_to_thread().w()?;
        let uid = UniqueId {
            internal: id.0.map(|b| c_char::from_ne_bytes([b])),
        };
        let mut comm: Comm = std::ptr::null_mut();
        // SAFETY: a live out-pointer, the id by value as nccl.h declares it;
        // the device's context is current on this thread.
        let code = unsafe { (lib.init_rank)(&mut comm, nranks, uid, r) };
        lib.check(code, "ncclCommInitRank")?;
        Ok(Self {
            lib,
            comm: Mutex::new(Some(comm)),
            aborted: AtomicBool::new(false),
            left: AtomicUsize::new(0),
            device: device.clone(),
            rank,
        })
    }

    fn aborted_error(&self) -> Error {
        Error::Distributed(format!(
            "NCCL communicator of rank {} was aborted (another rank failed, or an earlier \
             collective failed or timed out)",
            self.rank
        ))
    }

    /// Runs `f` on the communicator under its lock, unless aborted.
    fn with_comm<R>(&self, f: impl FnOnce(Comm) -> R) -> Result<R> {
        let r = {
            let guard = self.comm.lock().unwrap_or_else(PoisonError::into_inner);
            match *guard {
                Some(c) if !self.aborted.load(Ordering::SeqCst) => Some(f(c)),
                _ => None,
            }
        };
        // An abort() that came while the lock was held could not abort: do it
        // now (the fence pairs with abort's: one of the two sees the other).
        fence(Ordering::SeqCst);
        if self.aborted.load(Ordering::SeqCst) {
            self.abort();
            return Err(self.aborted_error());
        }
        r.ok_or_else(|| self.aborted_error())
    }

    /// Sum of `t` over all ranks. `t`: a contiguous f32 tensor on this
    /// communicator's device; the result has its shape, on the same device.
    /// Fails after `timeout` (and aborts the communicator) rather than wait
    /// forever for a rank that died.
    pub(crate) fn all_reduce_sum(&self, t: &Tensor, timeout: Duration) -> Result<Tensor> {
        let lib = self.lib;
        if self.aborted.load(Ordering::SeqCst) {
            return Err(self.aborted_error());
        }
        if let Some(why) = self.left_error() {
            return Err(Error::Distributed(why));
        }
        let device = Device::Cuda(self.device.clone());
        if t.dtype() != DType::F32 || !t.is_contiguous() || !t.device().same_device(&device) {
            return Err(Error::Distributed(format!(
                "all-reduce needs a contiguous f32 tensor on the communicator's device, got {:?} on {:?}",
                t.dtype(),
                t.device()
            )));
        }
        let n = t.elem_count();
        if n == 0 {
            return Ok(t.clone());
        }
        let stream = self.device.cuda_stream();
        stream.context().bind_to_thread().w()?;
        // SAFETY: ncclAllReduce writes all n elements; on failure the buffer is dropped unread.
        let mut out = unsafe { self.device.alloc::<f32>(n)? };
        {
            let (storage, layout) = t.storage_and_layout();
            let Storage::Cuda(s) = &*storage else {
                return Err(Error::Distributed("all-reduce input is not on CUDA".into()));
            };
            let off = layout.start_offset();
            let input = s
                .as_cuda_slice::<f32>()?
                .try_slice(off..off + n)
                .ok_or_else(|| {
                    Error::Distributed("all-reduce input is smaller than its layout".into())
                })?;
            let (src, _src_guard) = input.device_ptr(&stream);
            let (dst, _dst_guard) = out.device_ptr_mut(&stream);
            let (send, recv, cu) = (src as *const c_void, dst as *mut c_void, stream.cu_stream());
            // SAFETY: n f32 elements at send and recv on this device, ordered on
            // Candle's stream (guards held until after the call); the context
            // is current; the lock makes this the only call on c.
            let all_reduce = |c| unsafe {
                (lib.all_reduce)(send, recv, n, NCCL_FLOAT32, NCCL_SUM, c, cu.cast())
            };
            let code = self.with_comm(all_reduce)?;
            if let Err(e) = lib.check(code, "ncclAllReduce") {
                self.abort();
                return Err(e);
            }
        }
        let done = stream.record_event(None).w()?;
        let start = Instant::now();
        while !done.try_is_complete().w()? {
            let mut state = NCCL_SUCCESS;
            // SAFETY: a live out-pointer; the lock makes this the only call on c.
            let code = self.with_comm(|c| unsafe { (lib.async_error)(c, &mut state) })?;
            let elapsed = start.elapsed();
            let failure = if let Err(e) = lib.check(code, "ncclCommGetAsyncError") {
                Some(e.to_string())
            } else if state != NCCL_SUCCESS && state != NCCL_IN_PROGRESS {
                Some(format!("NCCL reported {}", lib.message(state)))
            } else if let Some(why) = self.left_error().filter(|_| elapsed >= LEFT_GRACE) {
                Some(why)
            } else {
                (elapsed >= timeout)
                    .then(|| format!("timeout after {:.1} s", timeout.as_secs_f64()))
            };
            if let Some(why) = failure {
                self.abort();
                return Err(Error::Distributed(format!(
                    "all-reduce on rank {}: {why}; communicator aborted",
                    self.rank
                )));
            }
            if elapsed < SPIN {
                std::thread::yield_now();
            } else {
                std::thread::sleep(POLL);
            }
        }
        let storage = CudaStorage::wrap_cuda_slice(out, self.device.clone());
        Ok(Tensor::from_storage(
            Storage::Cuda(storage),
            t.shape().clone(),
            BackpropOp::none(),
            false,
        ))
    }

    /// Records that rank `peer` left the group on purpose (its goodbye came):
    /// sums from now on fail instead of waiting for it.
    pub(crate) fn peer_left(&self, peer: usize) {
        let _ = self
            .left
            .compare_exchange(0, peer + 1, Ordering::SeqCst, Ordering::SeqCst);
    }

    fn left_error(&self) -> Option<String> {
        match self.left.load(Ordering::SeqCst) {
            0 => None,
            p => Some(format!(
                "rank {} left the process group (it finished or stopped), so this sum on rank {} \
                 cannot complete: every rank must run the same steps",
                p - 1,
                self.rank
            )),
        }
    }

    /// Marks the communicator aborted and calls `ncclCommAbort` (once), from
    /// any thread, e.g. when another rank died; a later
    /// [`NcclComm::all_reduce_sum`] fails at once.
    pub(crate) fn abort(&self) {
        self.aborted.store(true, Ordering::SeqCst);
        // A busy lock means a call is in flight: its thread aborts when it returns.
        fence(Ordering::SeqCst);
        let Ok(mut guard) = self.comm.try_lock() else {
            return;
        };
        if let Some(c) = guard.take() {
            // SAFETY: a live communicator, taken out under the lock so no other
            // call uses it now or later.
            unsafe { (self.lib.abort)(c) };
        }
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        let comm = self
            .comm
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(c) = comm {
            // Errors cannot be reported from drop; NCCL uses the comm's own device.
            let _ = self.device.cuda_stream().context().bind_to_thread();
            let f = if self.aborted.load(Ordering::SeqCst) {
                self.lib.abort
            } else {
                self.lib.destroy
            };
            // SAFETY: a live communicator no other thread can reach (&mut self).
            unsafe { f(c) };
        }
    }
}
