/*
 * bindshim: make MP-SPDZ listen only on the address the hosts file gives.
 *
 * MP-SPDZ's ServerSocket binds INADDR_ANY (every interface). Loaded with LD_PRELOAD into
 * semi2k-party.x, this replaces a bind() to 0.0.0.0 by a bind() to $FACEREC_BIND_ADDR.
 * Every other bind() passes through unchanged. If the variable is set but not an IPv4
 * address, bind() fails with EINVAL instead of silently listening everywhere.
 *
 * MP-SPDZ also connects to its own listener at 127.0.0.1 (its "send to self" socket), which
 * a listener on another address does not answer: connect() to 127.0.0.1:$FACEREC_SELF_PORT
 * is sent to $FACEREC_BIND_ADDR instead, which stays on this host all the same.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dlfcn.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

typedef int (*bind_fn)(int, const struct sockaddr *, socklen_t);
typedef int (*connect_fn)(int, const struct sockaddr *, socklen_t);

int bind(int fd, const struct sockaddr *addr, socklen_t len)
{
    static bind_fn real_bind = NULL;
    if (!real_bind)
        real_bind = (bind_fn)dlsym(RTLD_NEXT, "bind");
    const char *want = getenv("FACEREC_BIND_ADDR");
    if (want && addr && addr->sa_family == AF_INET && len >= (socklen_t)sizeof(struct sockaddr_in)) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)addr;
        if (in->sin_addr.s_addr == htonl(INADDR_ANY)) {
            struct sockaddr_in copy;
            memcpy(&copy, in, sizeof copy);
            if (inet_pton(AF_INET, want, &copy.sin_addr) != 1) {
                errno = EINVAL;
                return -1;
            }
            return real_bind(fd, (const struct sockaddr *)&copy, sizeof copy);
        }
    }
    return real_bind(fd, addr, len);
}

int connect(int fd, const struct sockaddr *addr, socklen_t len)
{
    static connect_fn real_connect = NULL;
    if (!real_connect)
        real_connect = (connect_fn)dlsym(RTLD_NEXT, "connect");
    const char *want = getenv("FACEREC_BIND_ADDR");
    const char *self_port = getenv("FACEREC_SELF_PORT");
    if (want && self_port && addr && addr->sa_family == AF_INET && len >= (socklen_t)sizeof(struct sockaddr_in)) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)addr;
        if (in->sin_addr.s_addr == htonl(INADDR_LOOPBACK) && ntohs(in->sin_port) == atoi(self_port)) {
            struct sockaddr_in copy;
            memcpy(&copy, in, sizeof copy);
            if (inet_pton(AF_INET, want, &copy.sin_addr) != 1) {
                errno = EINVAL;
                return -1;
            }
            return real_connect(fd, (const struct sockaddr *)&copy, sizeof copy);
        }
    }
    return real_connect(fd, addr, len);
}
