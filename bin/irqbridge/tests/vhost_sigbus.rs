// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A frontend that shrinks its guest memory file under the backend loses its own connection;
//! the `irqbridge vhost-user` process and the other socket's frontend live on.

mod vhost_common;

use irqbridge_vhost_user::abi::DOORBELL_QUEUE;
use vhost::VhostBackend;

use vhost_common::{TempDir, frontend, round_trip, serve, served, wait_until};

#[test]
fn vhost_user_truncated_guest_memory_ends_only_that_connection() {
    let dir = TempDir::new("sigbus");
    let a_sock = dir.join("a.sock");
    let b_sock = dir.join("b.sock");
    let mut server = serve(
        &dir,
        &[&a_sock, &b_sock],
        &[
            "--link", "0.1:0.2", "--link", "1.1:1.2", "--link", "0.5:1.5",
        ],
    );
    let mut a = frontend(&a_sock, &[(2, 0)]);
    a.post_event_buffers(0, 16, 8).unwrap();
    round_trip(&mut a, &[1]);

    for round in 0..3 {
        let mut b = frontend(&b_sock, &[(2, 0), (5, 0)]);
        b.post_event_buffers(0, 16, 8).unwrap();
        round_trip(&mut b, &[1]);
        // B shrinks its RAM to nothing. From here on this process must not touch B's RAM
        // either: only eventfds and the socket.
        b.ram().file().set_len(0).unwrap();
        if round != 1 {
            // A's doorbell on port 5 is an event in B's page: A's worker touches B's memory.
            a.doorbell(&[5]).unwrap();
        }
        if round != 0 {
            // B kicks its doorbell queue: B's worker reads B's rings.
            b.queue(DOORBELL_QUEUE).unwrap().kick_fd().write(1).unwrap();
        }
        wait_until("B's connection to end", 10, || {
            b.frontend().get_features().is_err()
        });
        assert!(server.alive(), "the process survived");
        round_trip(&mut a, &[1]);
        drop(b);
    }
    let log = vhost_common::log(&dir);
    assert_eq!(
        log.matches("ending the frontend connection: its guest memory")
            .count(),
        3,
        "one SIGBUS per round, each ending B's connection:\n{log}"
    );
    // The other frontend kept working throughout, and B's socket serves a fresh frontend.
    round_trip(&mut a, &[1]);
    drop(a);
    assert!(served(&b_sock));
    assert!(served(&a_sock));
    server.stop();
}
