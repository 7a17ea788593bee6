# Sourced by the GPU scripts: `unpack FILE.xz DEST` decompresses a carried binary (xz, or
# Python's lzma where xz is missing) and makes it executable.
unpack() {
  if command -v xz >/dev/null; then
    xz -dc "$1" >"$2"
  else
    python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$1" "$2"
  fi
  chmod +x "$2"
}
