/*
 * bindshim: make MP-SPDZ listen only on the address the hosts file gives.
 *
 * MP-SPDZ's ServerSocket binds INADDR_ANY (every interface). Loaded with LD_PRELOAD into
 * semi2k-party.x, this replaces a bind() to 0.0.0.0 by a bind() to $FACEREC_BIND_ADDR.
 * Every other bind() passes through unchanged. If the variable is set but not an IPv4
 * address, bind() fails with EINVAL instead of silently listening everywhere.
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
