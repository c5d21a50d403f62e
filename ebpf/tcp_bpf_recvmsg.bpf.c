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
 * The counting itself (reader_took) is in reader_progress.h, shared with the
 * sock_recv_length tracepoint (sock_recv_length.bpf.c), which the loader
 * tries where the kernel refuses fexit programs. */
#include "merbridge.h"
#include "reader_progress.h"

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
