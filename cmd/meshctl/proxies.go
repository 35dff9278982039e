package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/http"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/meshca/meshca/sds"
)

// proxiesCmd prints the proxies connected to meshca's SDS, from the admin
// port's /proxies, soonest certificate expiry first.
func proxiesCmd(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("meshctl proxies", flag.ContinueOnError)
	fs.SetOutput(stderr)
	admin := fs.String("admin", "http://127.0.0.1:15014", "meshca's admin URL")
	asJSON := fs.Bool("json", false, "print the JSON as served")
	if err := fs.Parse(args); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, strings.TrimSuffix(*admin, "/")+"/proxies", nil)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return fmt.Errorf("get proxies: %w", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return fmt.Errorf("read proxies: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("get proxies: %s: %s", resp.Status, strings.TrimSpace(string(body)))
	}
	if *asJSON {
		_, err := stdout.Write(body)
		return err
	}
	var proxies []sds.Proxy
	if err := json.Unmarshal(body, &proxies); err != nil {
		return fmt.Errorf("decode proxies: %w", err)
	}
	printProxies(stdout, proxies, time.Now())
	return nil
}

func printProxies(w io.Writer, proxies []sds.Proxy, now time.Time) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "IDENTITY\tNODE\tMODE\tRESOURCES\tSERIAL\tEXPIRES IN\tNEXT RENEWAL\tBUNDLE\tLAST ACK\tLAST NACK")
	for _, p := range proxies {
		bundle := "current"
		if !p.BundleCurrent {
			bundle = "stale"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s/%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", p.Identity, orDash(p.Node), p.Mode, p.Protocol,
			strings.Join(p.Resources, ","), orDash(shortSerial(p.Serial)), until(p.NotAfter, now), until(p.NextRenewal, now),
			bundle, ago(p.LastACK, now), nack(p, now))
	}
	_ = tw.Flush()
	fmt.Fprintf(w, "%d proxies\n", len(proxies))
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func shortSerial(s string) string {
	if len(s) > 12 {
		return s[:12]
	}
	return s
}

func until(t *time.Time, now time.Time) string {
	if t == nil {
		return "-"
	}
	return t.Sub(now).Round(time.Second).String()
}

func ago(t *time.Time, now time.Time) string {
	if t == nil {
		return "-"
	}
	return now.Sub(*t).Round(time.Second).String() + " ago"
}

func nack(p sds.Proxy, now time.Time) string {
	if p.LastNACK == nil {
		return "-"
	}
	return ago(p.LastNACK, now) + ": " + p.NACKDetail
}
