#!/bin/sh
# Build the hotsite appliance root filesystem: Debian 12 by debootstrap, the
# hotsite_appliance role applied inside it through a chroot (hotsite's own
# Ansible connection, provisioning/ansible/connection_plugins), first-boot
# setup installed, and everything that must differ per server removed.
# build-disk.sh then packs it into a bootable disk image.
#
#   images/build-rootfs.sh OUT_DIR WHEEL_DIR VARS_FILE [MIRROR]
#
# OUT_DIR/rootfs is the tree; VARS_FILE is YAML with hotsite_config (the
# appliance's config; hostname, addresses and secrets come at first boot).
# Needs root, debootstrap and ansible-core (the project's virtualenv has it).
#
# The tree is always built from scratch, never over an earlier build (a role
# applied over a kept tree inherits whatever an older role left there). What
# is kept between builds is the bare debootstrap, as a tarball in
# HOTSITE_IMAGE_CACHE (default /var/tmp/hotsite-image-cache), named by a hash
# of the suite, mirror, architecture and package list so a change to any of
# them makes a new one, and used for at most HOTSITE_DEBOOTSTRAP_MAX_AGE_DAYS
# (default 7) so security updates are not held back for long. It is written
# under a temporary name and renamed when complete; one that does not unpack
# is deleted and debootstrap runs again.
set -eu
out=$1 wheels=$2 vars=$3 mirror=${4:-http://deb.debian.org/debian}
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
mkdir -p "$out"
out=$(cd "$out" && pwd) wheels=$(cd "$wheels" && pwd)
root="$out/rootfs"
# What a booted appliance needs beyond minbase: the kernel and initramfs (the
# disk image boots them with systemd-boot, whose EFI binary is the last one),
# systemd as init, udev for the modem rule, ifupdown + a DHCP client for the
# network the first boot writes, sshd for the technician, fsck and the
# partition tools the first boot grows the root with, Python for the role and the daemon.
packages=linux-image-amd64,initramfs-tools,systemd-boot-efi,systemd,systemd-sysv,udev,dbus,kmod
packages=$packages,e2fsprogs,dosfstools,fdisk
packages=$packages,ifupdown,isc-dhcp-client,iproute2,iputils-ping,openssh-server,ca-certificates,procps,less,vim-tiny
packages=$packages,python3,python3-venv,python3-apt,python3-packaging
cache=${HOTSITE_IMAGE_CACHE:-/var/tmp/hotsite-image-cache}
max_age_days=${HOTSITE_DEBOOTSTRAP_MAX_AGE_DAYS:-7}
key=$(printf '%s\n' bookworm "$mirror" "$(dpkg --print-architecture)" "$packages" | sha256sum | cut -c1-16)
tarball="$cache/debootstrap-bookworm-$key.tar"
# A half-built tree from an interrupted run: never delete through a bind mount.
for fs in dev sys proc; do umount -R "$root/$fs" 2>/dev/null || true; done
if findmnt -rn -o TARGET | grep -q "^$root/"; then
    echo "build-rootfs: something is still mounted under $root; unmount it first" >&2; exit 1
fi
rm -rf "$root" "$out/.debootstrap-done"
mkdir -p "$root" "$cache"
started=$(date +%s)
fresh=yes
if [ -f "$tarball" ] && [ -n "$(find "$tarball" -mtime -"$max_age_days")" ]; then
    if tar -C "$root" --numeric-owner -xpf "$tarball"; then
        fresh=no
        echo "debootstrap: unpacked the cached $tarball in $(( $(date +%s) - started ))s"
    else
        echo "build-rootfs: $tarball does not unpack; deleting it and running debootstrap" >&2
        rm -f "$tarball"; rm -rf "$root"; mkdir -p "$root"
    fi
fi
if [ "$fresh" = yes ]; then
    # Once more after a failure: a mirror's transient error must not fail a 10-minute CI job.
    debootstrap --variant=minbase --include="$packages" bookworm "$root" "$mirror" || {
        echo "build-rootfs: debootstrap failed; once more in 30 s" >&2
        for fs in dev sys proc; do umount -R "$root/$fs" 2>/dev/null || true; done
        sleep 30; rm -rf "$root"; mkdir -p "$root"
        debootstrap --variant=minbase --include="$packages" bookworm "$root" "$mirror"
    }
    echo "debootstrap: $(( $(date +%s) - started ))s (fresh)"
    # Kept without the downloaded packages (half its size): the tree has them installed.
    rm -f "$root"/var/cache/apt/archives/*.deb
    tar -C "$root" --numeric-owner -cpf "$tarball.tmp.$$" . && mv -f "$tarball.tmp.$$" "$tarball" \
        || { rm -f "$tarball.tmp.$$"; echo "build-rootfs: could not keep the debootstrap in $cache" >&2; }
    # Older tarballs (another package list or mirror) are never used again.
    find "$cache" -maxdepth 1 -name 'debootstrap-bookworm-*.tar' ! -name "${tarball##*/}" -delete
fi
# Kernel filesystems for the role's tasks (apt, useradd); unmounted on exit.
for fs in proc sys dev; do mount --rbind "/$fs" "$root/$fs"; mount --make-rslave "$root/$fs"; done
trap 'for fs in dev sys proc; do umount -R "$root/$fs" 2>/dev/null || true; done' EXIT
# The resolver for the role's apt tasks (emptied again below).
cp /etc/resolv.conf "$root/etc/resolv.conf"
# A cached debootstrap's package lists may be days old (superseded packages
# are gone from the mirror): read them again for the role's apt tasks.
[ "$fresh" = yes ] || chroot "$root" apt-get -o Acquire::Retries=3 update -qq
inventory="$out/inventory.yml"
cat > "$inventory" <<INV
appliances:
  hosts:
    "$root":
      ansible_connection: hotsite_chroot
      ansible_python_interpreter: /usr/bin/python3
      hotsite_wheel_dir: "$wheels"
INV
PATH="$repo/.venv/bin:$PATH" PYTHONPATH="$repo" ANSIBLE_NOCOLOR=1 \
ANSIBLE_ROLES_PATH="$repo/provisioning/ansible/roles" \
ANSIBLE_FILTER_PLUGINS="$repo/provisioning/ansible/filter_plugins" \
ANSIBLE_CONNECTION_PLUGINS="$repo/provisioning/ansible/connection_plugins" \
    ansible-playbook -i "$inventory" -e "@$vars" "$repo/provisioning/ansible/appliance.yml"
echo "role: $(( $(date +%s) - started ))s since the start of the build"

install -m 0755 "$here/firstboot/hotsite-firstboot" "$root/usr/local/sbin/hotsite-firstboot"
install -m 0644 "$here/firstboot/hotsite-firstboot.service" "$root/etc/systemd/system/hotsite-firstboot.service"
ln -sf /etc/systemd/system/hotsite-firstboot.service "$root/etc/systemd/system/multi-user.target.wants/hotsite-firstboot.service"
# A new kernel or initramfs is copied to the EFI partition, where systemd-boot loads it.
install -D -m 0755 "$here/kernel-hook/zz-hotsite-esp" "$root/etc/kernel/postinst.d/zz-hotsite-esp"
install -D -m 0755 "$here/kernel-hook/zz-hotsite-esp" "$root/etc/initramfs/post-update.d/zz-hotsite-esp"
# systemd's own first-boot wizard would stop the boot at a console prompt for
# a locale and a root password; hotsite-firstboot does the setup instead.
ln -sf /dev/null "$root/etc/systemd/system/systemd-firstboot.service"
# Per server, made at first boot: the machine id (empty file: systemd makes
# one) and the SSH host keys (hotsite-firstboot). Not the build machine's
# name and resolver either.
: > "$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id" "$root"/etc/ssh/ssh_host_*
echo hotsite > "$root/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 hotsite\n' > "$root/etc/hosts"
: > "$root/etc/resolv.conf"
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/*_Packages "$root"/root/.ansible "$root"/tmp/* "$root"/var/tmp/*
echo "rootfs ready: $root"
