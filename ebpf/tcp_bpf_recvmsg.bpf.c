/* fexit on the kernel's recvmsg of sockets in a sockmap (tcp_bpf_recvmsg, and
 * tcp_bpf_recvmsg_parser when a stream verdict program is attached): count
 * the bytes a spliced socket's reader took, against the bytes its peer
 * redirected into it (peer_backlogs; sk_msg.bpf.c, "Backpressure").
 *
 * Why these two functions: they are what a TCP socket in a sockmap has as
 * its proto's recvmsg on every kernel we support (6.1 to 6.18), so they are
 * not inlined, and their return value is what the app received. Lower
 * functions moved: 6.18 reads through __sk_msg_recvmsg, with sk_msg_recvmsg
 * a wrapper. They also return bytes that came through TCP; those are counted
 * as read as well, which can only make the sender's view more generous
 * after it switched to TCP, when it no longer looks.
 *
 * Compiled and loaded as a second module (merbridge_py/loader.py), so that a
 * kernel that cannot attach it still gets the rest of the datapath.
 *
 * The receiving socket's own tuple comes from the head of its struct
 * sock_common, declared here rather than taken from the kernel's
 * <net/sock.h>: that header tripled the loader's compile time (CPU 1.4 s for
 * the main module, 2.7 s more for this one). Offsets checked in the BTF of
 * 6.1.192, 6.12.100, 6.12.118 and 6.18.44 (the same in all): skc_daddr 0,
 * skc_rcv_saddr 4, skc_dport 12, skc_num 14, skc_family 16, skc_v6_daddr 56,
 * skc_v6_rcv_saddr 72 (include/net/sock.h has kept this head for years). */
#include "merbridge.h"

struct sock;
struct msghdr;

struct sock_common_head {
    __be32 skc_daddr;
    __be32 skc_rcv_saddr;
    __u32 skc_hash;
    __be16 skc_dport;
    __u16 skc_num;               /* host order */
    __u16 skc_family;
    __u8 skc_state_and_flags[2];
    __s32 skc_bound_dev_if;
    __u64 skc_bind_node[2];
    __u64 skc_prot;
    __u64 skc_net;
    __u32 skc_v6_daddr[4];
    __u32 skc_v6_rcv_saddr[4];
};
_Static_assert(__builtin_offsetof(struct sock_common_head, skc_family) == 16, "sock_common head");
_Static_assert(__builtin_offsetof(struct sock_common_head, skc_v6_daddr) == 56, "sock_common head");
_Static_assert(__builtin_offsetof(struct sock_common_head, skc_v6_rcv_saddr) == 72, "sock_common head");

static __always_inline void reader_took(struct sock *sk, int flags, int copied)
{
    if (copied <= 0 || (flags & MSG_PEEK))
        return;
    struct sock_common_head head = {};
    if (bpf_probe_read_kernel(&head, sizeof(head), sk) != 0)
        return;
    struct sock_tuple t = {
        .local_port = head.skc_num,
        .remote_port = bpf_ntohs(head.skc_dport),   /* network order */
    };
    if (head.skc_family == AF_INET) {
        addr_set_v4(&t.local_ip, head.skc_rcv_saddr);
        addr_set_v4(&t.remote_ip, head.skc_daddr);
    } else if (head.skc_family == AF_INET6) {
        for (int i = 0; i < 4; i++) {
            t.local_ip.w[i] = head.skc_v6_rcv_saddr[i];
            t.remote_ip.w[i] = head.skc_v6_daddr[i];
        }
    } else {
        return;
    }
    struct sock_tuple *key = backlog_keys.lookup(&t);
    struct peer_backlog *b = peer_backlogs.lookup(key ? key : &t);
    if (b)
        __sync_fetch_and_add(&b->consumed, (__u64)copied);
}

/* The return value follows the arguments, whose number the loader reads from
 * the kernel's BTF: 6.18 dropped recvmsg's addr_len. */
#if RECVMSG_ARGUMENTS == 5
#define RECVMSG_ARGS struct sock *sk, struct msghdr *msg, size_t len, int flags, int *addr_len, int ret
#elif RECVMSG_ARGUMENTS == 4
#define RECVMSG_ARGS struct sock *sk, struct msghdr *msg, size_t len, int flags, int ret
#else
#error "RECVMSG_ARGUMENTS (4 or 5) is passed by the loader (merbridge_py/loader.py)"
#endif

KRETFUNC_PROBE(tcp_bpf_recvmsg, RECVMSG_ARGS)
{
    reader_took(sk, flags, ret);
    return 0;
}

KRETFUNC_PROBE(tcp_bpf_recvmsg_parser, RECVMSG_ARGS)
{
    reader_took(sk, flags, ret);
    return 0;
}
