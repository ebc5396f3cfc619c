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

/// A socket whose receive buffer was set: its port, the size the kernel
/// granted (Linux reports twice what was set, for its own bookkeeping), and
/// its inode, by which [`drops`] finds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enlarged {
    pub port: u16,
    pub granted: usize,
    pub inode: u64,
}

/// Sets the receive buffer of every UDP socket of this process bound to one
/// of `ports` to `bytes`, past `net.core.rmem_max` where the process may
/// (`CAP_NET_ADMIN`), else up to it.
pub fn enlarge(ports: &[u16], bytes: usize) -> io::Result<Vec<Enlarged>> {
    use rustix::process::{getpid, pidfd_getfd, pidfd_open, PidfdFlags, PidfdGetfdFlags};
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;
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
        let dup_raw = dup.as_raw_fd();
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
        let inode = std::fs::metadata(format!("/proc/self/fd/{dup_raw}"))?.ino();
        done.push(Enlarged {
            port,
            granted: socket.recv_buffer_size()?,
            inode,
        });
    }
    Ok(done)
}

/// Datagrams the kernel dropped on arrival at the sockets with these
/// inodes since they were opened, for want of room in their receive
/// buffers (the `drops` column of `/proc/net/udp`).
pub fn drops(inodes: &[u64]) -> io::Result<u64> {
    let mut total = 0;
    for table in ["/proc/self/net/udp", "/proc/self/net/udp6"] {
        let text = match std::fs::read_to_string(table) {
            Ok(t) => t,
            // No IPv6 in this kernel.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        total += drops_in(&text, inodes);
    }
    Ok(total)
}

fn drops_in(table: &str, inodes: &[u64]) -> u64 {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // sl local rem st queues timer retrnsmt uid timeout inode ref
            // pointer drops
            let inode: u64 = cols.get(9)?.parse().ok()?;
            let drops: u64 = cols.get(12)?.parse().ok()?;
            inodes.contains(&inode).then_some(drops)
        })
        .sum()
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
        assert_eq!(drops(&[done[0].inode]).unwrap(), 0);
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

    #[test]
    fn datagrams_dropped_for_want_of_buffer_are_counted_for_their_socket_only() {
        let flooded = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let quiet = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket2::SockRef::from(&flooded)
            .set_recv_buffer_size(4096)
            .unwrap();
        let ports = [
            flooded.local_addr().unwrap().port(),
            quiet.local_addr().unwrap().port(),
        ];
        let found = enlarge(&ports, 4096).unwrap();
        let inode = |port: u16| found.iter().find(|e| e.port == port).unwrap().inode;
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        // Nothing reads `flooded`: all but the first few are dropped.
        for _ in 0..200 {
            sender
                .send_to(&[7u8; 1200], flooded.local_addr().unwrap())
                .unwrap();
        }
        let dropped = drops(&[inode(ports[0])]).unwrap();
        assert!(dropped > 100, "{dropped} drops counted");
        assert_eq!(drops(&[inode(ports[1])]).unwrap(), 0);
    }

    #[test]
    fn the_drops_column_is_read_for_the_named_inodes() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
 1: 0100007F:A1B2 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 4242 2 0000000000000000 17
 2: 0100007F:A1B3 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 4343 2 0000000000000000 5
";
        assert_eq!(drops_in(table, &[4242]), 17);
        assert_eq!(drops_in(table, &[4242, 4343]), 22);
        assert_eq!(drops_in(table, &[1]), 0);
    }
}
