//! Larger kernel receive buffers for the node's QUIC sockets.
//!
//! libp2p-quic binds its UDP sockets itself and keeps the kernel's default
//! receive buffer (208 KiB on Linux). A bulk transfer overruns that whenever
//! the receiving task waits for a core: in `synod-lab bench` case 1 about
//! 1 % of datagrams were dropped, and each drop is a loss that halves the
//! sender's window. The sockets are not handed out, so they are found among
//! this process's descriptors by the port they are bound to.

use std::io;

use socket2::{Socket, Type};

/// The receive buffer asked for: at 1 Gbit/s, 32 ms of arrivals.
pub const RECV_BUFFER: usize = 4 << 20;

/// A socket whose receive buffer was set: its port, and the size the kernel
/// granted (Linux reports twice what was set, for its own bookkeeping).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enlarged {
    pub port: u16,
    pub granted: usize,
}

/// Sets the receive buffer of every UDP socket of this process bound to one
/// of `ports` to `bytes`, past `net.core.rmem_max` where the process may
/// (`CAP_NET_ADMIN`), else up to it.
pub fn enlarge(ports: &[u16], bytes: usize) -> io::Result<Vec<Enlarged>> {
    use rustix::process::{getpid, pidfd_getfd, pidfd_open, PidfdFlags, PidfdGetfdFlags};
    let me = pidfd_open(getpid(), PidfdFlags::empty())?;
    let mut done = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let Some(raw) = entry?.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        // A duplicate, owned here: the original may be closed meanwhile by
        // another thread, and then this fails or finds another file, which
        // the checks below leave alone.
        let Ok(dup) = pidfd_getfd(&me, raw, PidfdGetfdFlags::empty()) else {
            continue;
        };
        let socket = Socket::from(dup);
        if socket.r#type().ok() != Some(Type::DGRAM) {
            continue;
        }
        let Some(port) = socket
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .map(|a| a.port())
            .filter(|p| ports.contains(p))
        else {
            continue;
        };
        // Past net.core.rmem_max where the process may (CAP_NET_ADMIN).
        if rustix::net::sockopt::set_socket_recv_buffer_size_force(&socket, bytes).is_err() {
            socket.set_recv_buffer_size(bytes)?;
        }
        done.push(Enlarged {
            port,
            granted: socket.recv_buffer_size()?,
        });
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_socket_on_the_port_gets_the_buffer_and_others_are_left_alone() {
        let ours = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let other = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let before = socket2::SockRef::from(&other).recv_buffer_size().unwrap();
        let port = ours.local_addr().unwrap().port();
        let want = 3 << 20;
        let done = enlarge(&[port], want).unwrap();
        assert_eq!(done.len(), 1, "{done:?}");
        assert_eq!(done[0].port, port);
        let granted = socket2::SockRef::from(&ours).recv_buffer_size().unwrap();
        assert_eq!(done[0].granted, granted);
        // Linux reports twice what was set: all of it where the process may
        // force it, else up to net.core.rmem_max.
        let rmem_max: usize = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(
            granted == 2 * want || granted == 2 * want.min(rmem_max),
            "granted {granted}, asked {want}, rmem_max {rmem_max}"
        );
        assert_eq!(
            socket2::SockRef::from(&other).recv_buffer_size().unwrap(),
            before
        );
    }
}
