package e2e

import (
	"bytes"
	"testing"
)

// TestDataImage is the data-processor agent of the seed on the default image: a CSV uploaded to a
// read_only path, read with pandas, grouped, plotted with matplotlib to a PNG in a read_write path,
// and the PNG downloaded through the files API — in a sandbox with the default limits, with the
// Agg backend and the font list built with the image.
func TestDataImage(t *testing.T) {
	s := sharedServer(t)
	id := s.create(s.key, map[string]any{"filesystem": map[string]any{
		"read_only": []string{"/workspace/data"}, "read_write": []string{"/workspace/output"}}})
	csv := []byte("region,product,units,price\nnorth,apples,10,1.5\nsouth,apples,4,1.5\nnorth,pears,3,2.0\nsouth,pears,7,2.0\n")
	if status, m := s.put(id, "/workspace/data/sales.csv", csv); status != 201 {
		t.Fatalf("upload: %d %v", status, m)
	}
	r := s.run(s.key, id, `
import os
import pandas as pd
import matplotlib
import matplotlib.pyplot as plt
df = pd.read_csv("/workspace/data/sales.csv")
df["revenue"] = df["units"] * df["price"]
by_region = df.groupby("region")["revenue"].sum()
ax = by_region.plot.bar()
ax.figure.savefig("/workspace/output/revenue.png")
# matplotlib read the image's font list: it did not build one in its cache directory.
built = os.path.exists(os.path.join(matplotlib.get_cachedir(), "fontlist-v330.json"))
result = {"revenue": by_region.to_dict(), "backend": matplotlib.get_backend(), "font_list_built": built}
`, 120)
	if r["status"] != "completed" || r["stderr"] != "" {
		t.Fatalf("run: %v", r)
	}
	got := r["result"].(map[string]any)
	rev := got["revenue"].(map[string]any)
	if rev["north"] != 21.0 || rev["south"] != 20.0 || got["backend"] != "agg" || got["font_list_built"] != false {
		t.Fatalf("result: %v", got)
	}
	status, png, _ := s.get(id, "/workspace/output/revenue.png")
	if status != 200 || !bytes.HasPrefix(png, []byte("\x89PNG\r\n\x1a\n")) {
		t.Fatalf("download: %d, %d bytes starting %q", status, len(png), png[:min(len(png), 8)])
	}
}
