#!/usr/bin/env bash
# Prepares the LLVM that cubecl's CUDA and CPU back ends link against, without any download:
# Debian's llvm-22 is exposed where cubecl's LLVM bundler (tracel-llvm-bundler 23.1.0-4) looks
# for its own install, through an `llvm-config` wrapper that drops libraries Debian's static
# LLVM does not need here (z3, libxml2, Polly). Needed only for `--features cuda` or `cpu`.
set -euo pipefail
bundler_version=23.1.0-4
llvm_config=/usr/lib/llvm-22/bin/llvm-config
if [ ! -x "$llvm_config" ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq llvm-22-dev libzstd-dev >/dev/null
fi
data_home=${XDG_DATA_HOME:-$HOME/.local/share}
dir="$data_home/tracel/tracel-llvm-$bundler_version"
mkdir -p "$dir/bin"
cat >"$dir/bin/llvm-config" <<WRAP
#!/usr/bin/env bash
out=\$($llvm_config "\$@") || exit \$?
case " \$* " in
  *" --system-libs "*) out=\$(printf '%s\n' "\$out" | sed -E 's#[^ ]*libz3[^ ]*##g; s#(^| )-lz3( |\$)# #g; s#(^| )-lxml2( |\$)# #g') ;;
esac
case " \$* " in
  *" --libs "*|*" --libnames "*) out=\$(printf '%s\n' "\$out" | tr ' ' '\n' | grep -v -i polly | tr '\n' ' ') ;;
esac
printf '%s\n' "\$out"
WRAP
chmod +x "$dir/bin/llvm-config"
touch "$dir/.tracel-llvm-installed"
echo "LLVM prepared at $dir"
