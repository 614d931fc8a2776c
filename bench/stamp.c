/* stamp: report "the job's command has started" to the bench driver, as early as possible.
 *
 * The first thing main does is read CLOCK_MONOTONIC; then it sends
 * "<tag> <seconds>.<nanoseconds>" as one UDP datagram to 127.0.0.1:$STAMP_PORT and exits 0.
 * CLOCK_MONOTONIC is system-wide, so the driver compares the stamp with its own
 * time.monotonic() (which reads the same clock). bench/pool.py compiles this with
 * `cc -O2 -o bench/out/stamp bench/stamp.c` when it runs; no binary is committed.
 *
 * Usage: STAMP_PORT=PORT stamp TAG      (exit 2 on a usage error, 1 if the send fails)
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);     /* first: everything after this is not measured */

    const char *port_text = getenv("STAMP_PORT");
    if (argc < 2 || port_text == NULL) {
        fprintf(stderr, "usage: STAMP_PORT=PORT stamp TAG\n");
        return 2;
    }
    long port = strtol(port_text, NULL, 10);
    if (port <= 0 || port > 65535) {
        fprintf(stderr, "stamp: STAMP_PORT=%s is not a port\n", port_text);
        return 2;
    }

    char msg[256];
    int len = snprintf(msg, sizeof msg, "%.100s %lld.%09ld", argv[1], (long long)now.tv_sec, now.tv_nsec);

    struct sockaddr_in to;
    memset(&to, 0, sizeof to);
    to.sin_family = AF_INET;
    to.sin_port = htons((unsigned short)port);
    to.sin_addr.s_addr = htonl(INADDR_LOOPBACK);

    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    if (fd < 0 || sendto(fd, msg, (size_t)len, 0, (struct sockaddr *)&to, sizeof to) != len) {
        perror("stamp: sendto");
        return 1;
    }
    close(fd);
    return 0;
}
