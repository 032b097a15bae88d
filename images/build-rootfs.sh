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
# A finished debootstrap is kept (OUT_DIR/.debootstrap-done): a rebuild
# only re-applies the role.
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
if [ ! -f "$out/.debootstrap-done" ] || [ ! -d "$root" ]; then
    # A half-built tree from an interrupted run: never delete through a bind mount.
    for fs in dev sys proc; do umount -R "$root/$fs" 2>/dev/null || true; done
    if findmnt -rn -o TARGET | grep -q "^$root/"; then
        echo "build-rootfs: something is still mounted under $root; unmount it first" >&2; exit 1
    fi
    rm -rf "$root"
    started=$(date +%s)
    debootstrap --variant=minbase --include="$packages" bookworm "$root" "$mirror"
    echo "debootstrap: $(( $(date +%s) - started ))s"
    touch "$out/.debootstrap-done"
fi
# Kernel filesystems for the role's tasks (apt, useradd); unmounted on exit.
for fs in proc sys dev; do mount --rbind "/$fs" "$root/$fs"; mount --make-rslave "$root/$fs"; done
trap 'for fs in dev sys proc; do umount -R "$root/$fs" 2>/dev/null || true; done' EXIT
# A rebuild over a kept tree: the build removed the package lists and the
# resolver (below); the role's apt tasks may need both.
cp /etc/resolv.conf "$root/etc/resolv.conf"
ls "$root"/var/lib/apt/lists/*_Packages >/dev/null 2>&1 || chroot "$root" apt-get update -qq
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
