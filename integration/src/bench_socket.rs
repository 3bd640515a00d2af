// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The request-path rows of the benchmark, measured as deployed: the server is the real
//! `irqbridge vfio-user` binary in a process of its own, and the baseline is a raw
//! process-to-process AF_UNIX exchange of the same message sizes, with a forked child that
//! echoes. The server process (all its threads), the echo child and the measuring thread are
//! pinned to one CPU, so both paths pay the same context switches.
//!
//! - [`region_read_row`]: REGION_READ of 4 bytes (a 32-byte request, a 36-byte reply), one
//!   round trip per sample, against a 32/36-byte ping-pong.
//! - [`region_write_posted_row`]: throughput of posted (NO_REPLY) REGION_WRITEs of 4 bytes at
//!   pipeline depth 16: one sample is 16 posted writes sent back to back and a REGION_READ
//!   whose reply proves the 16 were applied (the server handles a connection's messages in
//!   order); reported per write and as writes per second, against the same bytes through the
//!   echo child (16 × 36 + 32 bytes in, 36 bytes out).
//!
//! The client side is identical for both paths: one `write` of the request bytes and reads of
//! the reply bytes on a blocking socket; only the peer differs.
//!
//! The server binary is `$IRQBRIDGE_BIN` if set, else this executable when it is `irqbridge`
//! (`irqbridge bench`), else an `irqbridge` next to this executable or one directory up
//! (examples and tests under `target/*/`).

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use irqbridge_vfio_user::conn::Connection;
use irqbridge_vfio_user::pci::regs::{MAGIC, REG_DOORBELL, REG_MAGIC, REGION_BAR0};
use irqbridge_vfio_user::proto::{
    Capabilities, Command as VfuCommand, FLAGS_NO_REPLY, HEADER_SIZE, Header, RegionAccess,
    RegionData, Version,
};

use crate::bench::{BenchOptions, BenchRow, Goal, Row, alternate, pin_current_thread};
use crate::error::{Error, Result};
use crate::stats::LatencyStats;

/// Posted writes per throughput sample.
pub const PIPELINE_DEPTH: usize = 16;
/// Goal of the REGION_READ row: measured p50 / baseline p50.
pub const REGION_READ_GOAL: f64 = 1.10;
/// Goal of the posted REGION_WRITE row: baseline ops/s / measured ops/s (per-write p50 ratio).
pub const REGION_WRITE_GOAL: f64 = 1.25;

/// The `irqbridge` binary that serves the device (see the module documentation).
///
/// # Errors
///
/// [`Error::InvalidArgument`] if none is found.
pub fn server_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("IRQBRIDGE_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().map_err(Error::Io)?;
    if exe.file_name().is_some_and(|n| n == "irqbridge") {
        return Ok(exe);
    }
    let mut dir = exe.parent();
    for _ in 0..2 {
        let Some(d) = dir else { break };
        let candidate = d.join("irqbridge");
        if candidate.is_file() {
            return Ok(candidate);
        }
        dir = d.parent();
    }
    Err(Error::InvalidArgument(
        "cannot find the irqbridge binary: build it (cargo build -p irqbridge) or set \
         IRQBRIDGE_BIN"
            .into(),
    ))
}

/// `irqbridge vfio-user` in its own process, pinned to one CPU; SIGTERM and wait on drop.
struct ServerProcess {
    child: Child,
    dir: PathBuf,
    socket: PathBuf,
}

impl ServerProcess {
    fn start(cpu: usize, tag: &str) -> Result<ServerProcess> {
        let dir =
            std::env::temp_dir().join(format!("irqbridge-bench-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(Error::Io)?;
        let socket = dir.join("vu.sock");
        let mut cmd = Command::new(server_binary()?);
        cmd.arg("vfio-user")
            .arg("--socket-path")
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: the closure runs in the forked child before exec and only calls
        // sched_setaffinity (a plain system call, async-signal-safe) on a stack-local set.
        unsafe {
            cmd.pre_exec(move || pin_self(cpu));
        }
        let child = cmd.spawn().map_err(Error::Io)?;
        let mut s = ServerProcess { child, dir, socket };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !s.socket.exists() {
            if let Some(st) = s.child.try_wait().map_err(Error::Io)? {
                return Err(Error::InvalidArgument(format!(
                    "irqbridge vfio-user exited at start: {st}"
                )));
            }
            if Instant::now() > deadline {
                return Err(Error::InvalidArgument(
                    "irqbridge vfio-user never created its socket".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(s)
    }

    /// A connected client that has negotiated VERSION, as a plain blocking stream.
    fn connect(&self) -> Result<UnixStream> {
        let stream = UnixStream::connect(&self.socket).map_err(Error::Io)?;
        let mut conn = Connection::new(stream);
        let v = Version {
            major: 0,
            minor: 0,
            capabilities: Capabilities::default(),
        };
        conn.request(VfuCommand::Version, &v.encode(), &[])
            .map_err(Error::Server)?;
        Ok(conn.into_stream())
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SAFETY: a signal to our own child process.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Pins the calling thread (and what it forks or spawns afterwards) to `cpu`.
fn pin_self(cpu: usize) -> std::io::Result<()> {
    // SAFETY: cpu_set_t is plain data; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET writes one bit inside `set`; `cpu` is below CPU_SETSIZE (checked).
    unsafe {
        if cpu >= libc::CPU_SETSIZE as usize {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
        libc::CPU_SET(cpu, &mut set);
    }
    // SAFETY: sched_setaffinity on the calling thread with a valid set of the given size.
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A forked child on the other end of a socket pair: receives `request` bytes, sends `reply`
/// bytes, until the socket closes. Killed and reaped on drop. It uses `recv`/`send` like the
/// server's `recvmsg`/`sendmsg` (plain `read`/`write` on a socket go through the VFS layer,
/// fsnotify included, and cost measurably more here, which would flatter the server).
struct EchoChild {
    pid: libc::pid_t,
    near: UnixStream,
}

impl EchoChild {
    /// Forks from the calling thread (so the child inherits its CPU pinning).
    fn start(request: usize, reply: usize) -> Result<EchoChild> {
        let (near, far) = UnixStream::pair().map_err(Error::Io)?;
        // Everything the child touches is allocated before the fork.
        let mut inbuf = vec![0u8; request];
        let outbuf = vec![0u8; reply];
        let far_fd = far.as_raw_fd();
        // SAFETY: fork in a process that may have other threads: the child only makes
        // async-signal-safe system calls (recv, send, _exit) on memory allocated before
        // the fork, and never returns into Rust code.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(Error::Io(std::io::Error::last_os_error()));
        }
        if pid == 0 {
            // SAFETY: see above; the buffers are live in the child's copy of the memory.
            unsafe { echo_loop(far_fd, &mut inbuf, &outbuf) }
        }
        drop(far);
        Ok(EchoChild { pid, near })
    }
}

/// The child's loop; never returns.
///
/// # Safety
///
/// Only for the child of a fork: uses nothing but recv, send and _exit.
unsafe fn echo_loop(fd: libc::c_int, inbuf: &mut [u8], outbuf: &[u8]) -> ! {
    loop {
        let mut got = 0usize;
        while got < inbuf.len() {
            // SAFETY: reading into the live buffer, within its length.
            let n =
                unsafe { libc::recv(fd, inbuf.as_mut_ptr().add(got).cast(), inbuf.len() - got, 0) };
            if n <= 0 {
                // SAFETY: ends the child without running any Rust code.
                unsafe { libc::_exit(0) };
            }
            got += n as usize;
        }
        let mut sent = 0usize;
        while sent < outbuf.len() {
            // SAFETY: writing from the live buffer, within its length.
            let n = unsafe {
                libc::send(
                    fd,
                    outbuf.as_ptr().add(sent).cast(),
                    outbuf.len() - sent,
                    libc::MSG_NOSIGNAL,
                )
            };
            if n <= 0 {
                // SAFETY: as above.
                unsafe { libc::_exit(0) };
            }
            sent += n as usize;
        }
    }
}

impl Drop for EchoChild {
    fn drop(&mut self) {
        let _ = self.near.shutdown(std::net::Shutdown::Both);
        // SAFETY: signalling and reaping our own child.
        unsafe {
            libc::kill(self.pid, libc::SIGKILL);
            libc::waitpid(self.pid, std::ptr::null_mut(), 0);
        }
    }
}

fn region_read_request() -> Vec<u8> {
    let body = RegionAccess {
        offset: REG_MAGIC,
        region: REGION_BAR0,
        count: 4,
    }
    .encode();
    let mut m = Header::command(1, VfuCommand::RegionRead, body.len())
        .encode()
        .to_vec();
    m.extend_from_slice(&body);
    m
}

fn posted_write(id: u16) -> Vec<u8> {
    let body = RegionData {
        offset: REG_DOORBELL,
        region: REGION_BAR0,
        data: 1u32.to_le_bytes().to_vec(),
    }
    .encode();
    let mut h = Header::command(id, VfuCommand::RegionWrite, body.len());
    h.flags |= FLAGS_NO_REPLY;
    let mut m = h.encode().to_vec();
    m.extend_from_slice(&body);
    m
}

/// One exchange: write `req` whole, read `reply.len()` bytes.
fn exchange(s: &mut UnixStream, req: &[u8], reply: &mut [u8]) -> Result<Duration> {
    let t0 = Instant::now();
    s.write_all(req).map_err(Error::Io)?;
    s.read_exact(reply).map_err(Error::Io)?;
    Ok(t0.elapsed())
}

fn row(
    row: Row,
    path: String,
    baseline: String,
    goal: f64,
    measured: &[Duration],
    base: &[Duration],
) -> Result<BenchRow> {
    BenchRow::new(row, &path, &baseline, Goal::AtMost(goal), measured, base)
}

/// Runs `f` on a thread pinned to `cpu` (the echo child is forked from it).
fn on_pinned_thread<T: Send + 'static>(
    cpu: usize,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let t = std::thread::Builder::new()
        .name("bench-socket".into())
        .spawn(move || {
            pin_current_thread(cpu)?;
            f()
        })
        .map_err(Error::Io)?;
    t.join().unwrap_or_else(|_| {
        Err(Error::InvalidArgument(
            "the benchmark thread panicked".into(),
        ))
    })
}

/// REGION_READ of 4 bytes on the `irqbridge vfio-user` process vs. a two-process ping-pong of
/// the same sizes, everything on `cpu`.
///
/// # Errors
///
/// The server binary is missing or fails; a socket error.
pub fn region_read_row(opts: &BenchOptions, cpu: usize) -> Result<BenchRow> {
    let opts = *opts;
    let (m, b) = on_pinned_thread(cpu, move || {
        let server = ServerProcess::start(cpu, "rr")?;
        let mut vfio = server.connect()?;
        let req = region_read_request();
        let reply_len = HEADER_SIZE + RegionAccess::SIZE + 4;
        let echo = EchoChild::start(req.len(), reply_len)?;
        let mut raw = echo.near.try_clone().map_err(Error::Io)?;
        let mut rep_v = vec![0u8; reply_len];
        let mut rep_r = vec![0u8; reply_len];
        let r = alternate(
            &opts,
            || {
                let d = exchange(&mut vfio, &req, &mut rep_v)?;
                if rep_v.get(reply_len - 4..) != Some(&MAGIC.to_le_bytes()[..]) {
                    return Err(Error::InvalidArgument(
                        "REGION_READ returned a wrong MAGIC".into(),
                    ));
                }
                Ok(d)
            },
            || exchange(&mut raw, &req, &mut rep_r),
        )?;
        drop(echo);
        drop(server);
        Ok(r)
    })?;
    let req = HEADER_SIZE + RegionAccess::SIZE;
    let rep = req + 4;
    row(
        Row::RegionRead,
        format!("vfio-user REGION_READ 4 B round trip (irqbridge process, CPU {cpu})"),
        format!("two-process AF_UNIX {req}/{rep} B ping-pong"),
        REGION_READ_GOAL,
        &m,
        &b,
    )
}

/// Posted REGION_WRITE throughput at pipeline depth [`PIPELINE_DEPTH`] on the
/// `irqbridge vfio-user` process vs. the same bytes through a forked echo, everything on
/// `cpu`. The stats are per write; the path names carry writes per second at p50.
///
/// # Errors
///
/// As [`region_read_row`].
pub fn region_write_posted_row(opts: &BenchOptions, cpu: usize) -> Result<BenchRow> {
    let opts = *opts;
    let (m, b) = on_pinned_thread(cpu, move || {
        let server = ServerProcess::start(cpu, "rw")?;
        let mut vfio = server.connect()?;
        let mut batch = Vec::new();
        for i in 0..PIPELINE_DEPTH {
            batch.extend_from_slice(&posted_write(100 + i as u16));
        }
        batch.extend_from_slice(&region_read_request());
        let reply_len = HEADER_SIZE + RegionAccess::SIZE + 4;
        let echo = EchoChild::start(batch.len(), reply_len)?;
        let mut raw = echo.near.try_clone().map_err(Error::Io)?;
        let mut rep_v = vec![0u8; reply_len];
        let mut rep_r = vec![0u8; reply_len];
        let per_op = |d: Duration| d / PIPELINE_DEPTH as u32;
        let r = alternate(
            &opts,
            || exchange(&mut vfio, &batch, &mut rep_v).map(per_op),
            || exchange(&mut raw, &batch, &mut rep_r).map(per_op),
        )?;
        // Every posted write reached the device: DOORBELL_COUNT counts them.
        let mut conn = Connection::new(vfio);
        let body = RegionAccess {
            offset: irqbridge_vfio_user::pci::regs::REG_DOORBELL_COUNT,
            region: REGION_BAR0,
            count: 4,
        }
        .encode();
        let reply = conn
            .request(VfuCommand::RegionRead, &body, &[])
            .map_err(Error::Server)?;
        let data = RegionData::parse(&reply.body).map_err(Error::Server)?;
        let want = ((opts.warmup + opts.iterations) * PIPELINE_DEPTH) as u32;
        let got = data
            .data
            .get(..4)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map(u32::from_le_bytes);
        if got != Some(want) {
            return Err(Error::InvalidArgument(format!(
                "posted writes lost: DOORBELL_COUNT {got:?}, sent {want}"
            )));
        }
        drop(echo);
        drop(server);
        Ok(r)
    })?;
    let ops = |d: &[Duration]| {
        LatencyStats::from_durations(d).map_or(0.0, |s| 1e6 / s.p50_us.max(f64::MIN_POSITIVE))
    };
    let (mo, bo) = (ops(&m), ops(&b));
    row(
        Row::RegionWritePosted,
        format!(
            "posted REGION_WRITE x{PIPELINE_DEPTH} + read, per write ({:.0} k/s)",
            mo / 1e3
        ),
        format!("same bytes, two-process echo ({:.0} k/s)", bo / 1e3),
        REGION_WRITE_GOAL,
        &m,
        &b,
    )
}
