// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Long help texts (`--help`, the man page) of `irqbridge` and its subcommands.

/// `irqbridge --help`: description.
pub const MAIN_ABOUT: &str = "\
Out-of-process interrupt device server for KVM virtual machines.

irqbridge serves a PCI test device (INTx with resample, MSI-X, event channels) over vfio-user
and an event-channel device over vhost-user. The VMM registers the device's eventfds straight
with KVM (irqfd, ioeventfd), so interrupts and doorbells bypass both processes' main loops.
`demo` and `bench` run everything end to end on /dev/kvm with a built-in test VMM.";

/// `irqbridge --help`: after the options.
pub const MAIN_AFTER: &str = "\
Examples:
  irqbridge vfio-user --socket-path /run/irqbridge/vu.sock --control-socket /run/irqbridge/ctl.sock
  irqbridge control --socket /run/irqbridge/ctl.sock msix-fire 3
  irqbridge vhost-user --socket-path /run/irqbridge/evtchn.sock
  irqbridge demo
  irqbridge bench --samples 2000 --json target/bench.json
  irqbridge completions bash > /etc/bash_completion.d/irqbridge
  irqbridge man > irqbridge.1

Environment:
  RUST_LOG               log filter (env_logger syntax) when --log-level is not given
  LISTEN_FDS, LISTEN_PID systemd socket activation for vfio-user and vhost-user
  JOURNAL_STREAM         when stderr is the journal, log lines carry <N> priority prefixes

Signals:
  SIGTERM, SIGINT        the servers stop, drop their clients, remove the socket files they
                         created and exit 0; a second signal exits at once with 128+N

Exit status:
  0  success
  1  failure: a server error, a failed request, a failed scenario or a missed benchmark goal
  2  usage error: a bad option or option value (the message names the option)";

/// `irqbridge vfio-user --help`: description.
pub const VFIO_USER_ABOUT: &str = "\
Serve the irqbridge PCI test device (docs/device-abi.md) over vfio-user.

The server listens on a unix socket for one VMM (vfio-user client) at a time and serves the next
one after it disconnects. The listening socket is one of: a path it creates (--socket-path,
mode 0600, removed on exit), an inherited descriptor (--fd), or, with neither option, the one
socket systemd passes (LISTEN_FDS=1, LISTEN_PID = this process; see docs/systemd/).";

/// `irqbridge vfio-user --help`: after the options.
pub const VFIO_USER_AFTER: &str = "\
Examples:
  irqbridge vfio-user -s /run/irqbridge/vu.sock
  irqbridge vfio-user -s /tmp/vu.sock --msix-vectors 64 --evtchn-ports 4096 --no-intx
  irqbridge vfio-user -s /tmp/vu.sock --control-socket /tmp/ctl.sock --log-level debug
  systemd-socket-activate -l /run/irqbridge/vu.sock irqbridge vfio-user

QEMU (11.1 and later) attaches it with
  -device '{\"driver\":\"vfio-user-pci\",\"socket\":{\"type\":\"unix\",\"path\":\"/run/irqbridge/vu.sock\"}}'

Exit status:
  0  stopped by SIGTERM or SIGINT
  1  the server failed (socket in use, peer-independent error)
  2  usage error (bad option value, bad --fd, no listening socket)";

/// `irqbridge control --help`: description.
pub const CONTROL_ABOUT: &str = "\
Send one request to a running device's control socket and print the JSON reply.

The control socket (vfio-user --control-socket, protocol in docs/control.md) drives the device
from the host side: raise and lower INTx, fire MSI-X vectors, send and bind event-channel
ports, read counters and state, reset.";

/// `irqbridge control --help`: after the options.
pub const CONTROL_AFTER: &str = "\
Examples:
  irqbridge control -s /tmp/ctl.sock msix-fire 3
  irqbridge control -s /tmp/ctl.sock evtchn-bind 7 1
  irqbridge control -s /tmp/ctl.sock counters | jq .counters

Exit status:
  0  the reply says {\"ok\": true}
  1  the reply says {\"ok\": false} (printed), or the socket cannot be reached
  2  usage error";

/// `irqbridge vhost-user --help`: description.
pub const VHOST_USER_ABOUT: &str = "\
Serve the event-channel device (docs/evtchn-virtio.md) as a vhost-user backend.

Each listening socket serves one frontend (VM) at a time; ports of different frontends can be
linked (--link) so that a doorbell in one VM is an event in another. The sockets come from
--socket-path (repeatable, created with mode 0600, removed on exit), --fd, or, with neither,
systemd socket activation (LISTEN_FDS=1). The options follow QEMU's vhost-user backend program
conventions (--socket-path, --fd, --print-capabilities); docs/vhost-user/ has the descriptor.
Started as vhost-user-* (a symlink to irqbridge), the program behaves as `irqbridge vhost-user`.";

/// `irqbridge vhost-user --help`: after the options.
pub const VHOST_USER_AFTER: &str = "\
Examples:
  irqbridge vhost-user -s /run/irqbridge/evtchn.sock
  irqbridge vhost-user -s /tmp/a.sock -s /tmp/b.sock --link 0.1:1.1 --ports 64
  irqbridge vhost-user --print-capabilities

QEMU attaches it with
  -chardev socket,id=c,path=/tmp/a.sock
  -device vhost-user-test-device-pci,chardev=c,virtio-id=21,num_vqs=6,config_size=24
(num_vqs is 2 + --upcalls; guest memory must be shared, e.g. memory-backend-memfd,share=on)

Exit status:
  0  stopped by SIGTERM or SIGINT, or capabilities printed
  1  the backend failed
  2  usage error (bad option value, bad --fd, no listening socket)";

/// `irqbridge demo --help`: description.
pub const DEMO_ABOUT: &str = "\
Run every interrupt scenario end to end and print a table.

Each scenario starts the device server in-process, attaches it to a test VM on /dev/kvm through
the irqbridge-kvm plugin and lets a bare-metal guest count the interrupts it receives (INTx with
resample, MSI-X, masking, event channels, vhost-user doorbells between two VMs).";

/// `irqbridge demo --help`: after the options.
pub const DEMO_AFTER: &str = "\
Examples:
  irqbridge demo
  irqbridge demo --json | jq '.rows[] | select(.passed | not)'

Exit status:
  0  every scenario passed
  1  a scenario failed, or /dev/kvm cannot be used
  2  usage error";

/// `irqbridge bench --help`: description.
pub const BENCH_ABOUT: &str = "\
Benchmark the interrupt paths against baselines measured in the same run.

Rows: MSI-X delivery, INTx assert/EOI/resample, the doorbell (ioeventfd) and a region read,
each against its baseline; with --vhost-user, the event-channel device's event latency and
throughput for 1, 64 and 4096 ports and the interdomain doorbell against an eventfd write.
Progress goes to stderr, the table to stdout, the report to the --json file and a latency CDF
plot per row (SVG) next to it.";

/// `irqbridge bench --help`: after the options.
pub const BENCH_AFTER: &str = "\
Examples:
  irqbridge bench
  irqbridge bench --row msix --samples 20000 --json /tmp/msix.json
  irqbridge bench --vhost-user --json target/vhost-bench.json

Exit status:
  0  every goal met
  1  a goal missed, or /dev/kvm cannot be used
  2  usage error (e.g. --samples 0, an unknown --row)";

/// `irqbridge completions --help`: description.
pub const COMPLETIONS_ABOUT: &str = "\
Print a shell completion script for irqbridge to stdout.";

/// `irqbridge completions --help`: after the options.
pub const COMPLETIONS_AFTER: &str = "\
Examples:
  irqbridge completions bash > /usr/share/bash-completion/completions/irqbridge
  irqbridge completions zsh > /usr/share/zsh/site-functions/_irqbridge
  irqbridge completions fish > ~/.config/fish/completions/irqbridge.fish

Exit status:
  0  printed
  1  stdout cannot be written
  2  usage error (unknown shell)";

/// `irqbridge man --help`: description.
pub const MAN_ABOUT: &str = "\
Print the irqbridge(1) man page (roff) to stdout, or write one page per command to a directory.";

/// `irqbridge man --help`: after the options.
pub const MAN_AFTER: &str = "\
Examples:
  irqbridge man | man -l -
  irqbridge man --dir /usr/share/man/man1

Exit status:
  0  written
  1  the output cannot be written
  2  usage error";

/// `irqbridge passthrough --help`: description.
pub const PASSTHROUGH_ABOUT: &str = "\
Serve a host PCI device bound to vfio-pci over vfio-user (docs/passthrough.md).

The server opens the device through VFIO (container, group, device) and serves it to one VMM at a
time. Interrupts go from the host kernel straight into the client's eventfds (INTx trigger and
unmask/resample, MSI and MSI-X vectors); the MSI-X table and PBA and the MSI mask bits are virtual
in the server, which switches a masked vector to its own eventfd and signals the client's once on
unmask if an event came meanwhile. DMA_MAP is mirrored into the VFIO container. The device must be
bound to vfio-pci, its IOMMU group viable, and /dev/vfio/N accessible to this process.";

/// `irqbridge passthrough --help`: after the options.
pub const PASSTHROUGH_AFTER: &str = "\
Examples:
  echo vfio-pci > /sys/bus/pci/devices/0000:00:04.0/driver_override
  echo 0000:00:04.0 > /sys/bus/pci/drivers_probe
  irqbridge passthrough --device 0000:00:04.0 -s /run/irqbridge/pt.sock
  irqbridge passthrough --device 0000:00:04.0 -s /tmp/pt.sock --mmap-bars

Exit status:
  0  stopped by SIGTERM or SIGINT
  1  the device cannot be opened (not found, not bound to vfio-pci, group not viable, no
     access to /dev/vfio) or the server failed
  2  usage error (malformed option, bad --fd, no listening socket)";
