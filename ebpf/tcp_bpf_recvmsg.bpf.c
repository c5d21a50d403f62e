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
 * kernel that cannot attach it still gets the rest of the datapath; only the
 * first fields of struct sock_common are read, whose layout has not changed
 * since long before 6.1 (the loader may compile against another kernel's
 * headers, see merbridge_py/kheaders.py). */
#include "merbridge.h"
#include <net/sock.h>

static __always_inline void reader_took(struct sock *sk, int flags, int copied)
{
    if (copied <= 0 || (flags & MSG_PEEK))
        return;
    struct sock_tuple t = {};
    __u16 family = sk->__sk_common.skc_family;
    t.local_port = sk->__sk_common.skc_num;                       /* host order */
    t.remote_port = bpf_ntohs(sk->__sk_common.skc_dport);         /* network order */
    if (family == AF_INET) {
        addr_set_v4(&t.local_ip, sk->__sk_common.skc_rcv_saddr);
        addr_set_v4(&t.remote_ip, sk->__sk_common.skc_daddr);
    } else if (family == AF_INET6) {
        for (int i = 0; i < 4; i++) {
            t.local_ip.w[i] = sk->__sk_common.skc_v6_rcv_saddr.in6_u.u6_addr32[i];
            t.remote_ip.w[i] = sk->__sk_common.skc_v6_daddr.in6_u.u6_addr32[i];
        }
    } else {
        return;
    }
    struct peer_backlog *b = peer_backlogs.lookup(&t);
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
