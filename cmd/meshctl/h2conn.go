package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	spb "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// h2Conn is a gRPC client connection for load generators: one unary call
// at a time, made synchronously on the caller's goroutine, over HTTP/2
// framing written and read directly. It is what a proxy does on its own
// connection to the CA, at a fraction of grpc-go's client cost: grpc-go
// hands every call to a reader and a writer goroutine and builds a stream
// object, about 90 µs of CPU per call here. The bench shares the cores
// with the server it measures, so that CPU was taken from the server.
//
// It honours HTTP/2 flow control both ways, answers SETTINGS and PING,
// and stops at GOAWAY; it does not multiplex, compress, or follow
// redirects of any kind.
type h2Conn struct {
	conn      net.Conn
	bw        *bufio.Writer
	fr        *http2.Framer
	hbuf      bytes.Buffer
	henc      *hpack.Encoder
	authority string

	nextStream uint32
	sendWindow int64  // connection-level window the server granted us
	streamInit int64  // the server's initial stream window
	maxFrame   uint32 // the server's maximum frame size
	unacked    uint32 // DATA bytes received and not yet credited back
	done       bool   // after GOAWAY or a broken frame exchange
	msg, body  []byte
}

// creditAt is when received DATA is credited back: a quarter of HTTP/2's
// default 64 KiB window, which this client never changes.
const creditAt = 16 << 10

// dialH2 opens a TLS connection with ALPN h2 and exchanges the HTTP/2
// prefaces.
func dialH2(ctx context.Context, addr string, cfg *tls.Config) (*h2Conn, error) {
	cfg = cfg.Clone()
	cfg.NextProtos = []string{"h2"}
	d := tls.Dialer{NetDialer: &net.Dialer{Timeout: 10 * time.Second}, Config: cfg}
	nc, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("dial %s: %w", addr, err)
	}
	if p := nc.(*tls.Conn).ConnectionState().NegotiatedProtocol; p != "h2" {
		nc.Close()
		return nil, fmt.Errorf("dial %s: the server did not agree to HTTP/2 (ALPN %q)", addr, p)
	}
	c := &h2Conn{
		conn: nc, bw: bufio.NewWriterSize(nc, 32<<10), authority: addr,
		nextStream: 1, sendWindow: 65535, streamInit: 65535, maxFrame: 16384,
	}
	c.fr = http2.NewFramer(c.bw, bufio.NewReaderSize(nc, 32<<10))
	c.fr.SetReuseFrames()
	c.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	c.fr.MaxHeaderListSize = 1 << 20
	c.henc = hpack.NewEncoder(&c.hbuf)
	if _, err := c.bw.WriteString(http2.ClientPreface); err != nil {
		nc.Close()
		return nil, err
	}
	if err := c.fr.WriteSettings(http2.Setting{ID: http2.SettingEnablePush, Val: 0}); err != nil {
		nc.Close()
		return nil, err
	}
	if err := c.bw.Flush(); err != nil {
		nc.Close()
		return nil, fmt.Errorf("dial %s: %w", addr, err)
	}
	return c, nil
}

// Close closes the connection.
func (c *h2Conn) Close() error { return c.conn.Close() }

// usable reports whether the connection may carry another call: not after
// a GOAWAY or an error that broke the framing.
func (c *h2Conn) usable() bool { return !c.done }

// errBroken marks errors after which the connection must be replaced.
var errBroken = errors.New("connection unusable")

// Invoke makes one unary call: method is "/package.Service/Method", token
// (if not empty) goes in the authorization header as a bearer token. The
// error is a gRPC status error, as grpc-go's would be.
func (c *h2Conn) Invoke(ctx context.Context, method, token string, req, resp proto.Message) error {
	if !c.usable() {
		return status.Error(codes.Unavailable, "connection closed by GOAWAY or an earlier error")
	}
	if dl, ok := ctx.Deadline(); ok {
		_ = c.conn.SetDeadline(dl)
	} else {
		_ = c.conn.SetDeadline(time.Time{})
	}
	err := c.invoke(method, token, req, resp)
	if errors.Is(err, errBroken) {
		c.done = true
		c.conn.Close()
		if ctx.Err() != nil {
			return status.FromContextError(ctx.Err()).Err()
		}
		if errors.Is(err, os.ErrDeadlineExceeded) {
			// The connection's deadline, which is ctx's, passed a moment
			// before ctx noticed.
			return status.Error(codes.DeadlineExceeded, err.Error())
		}
		return status.Error(codes.Unavailable, err.Error())
	}
	return err
}

func (c *h2Conn) invoke(method, token string, req, resp proto.Message) error {
	id := c.nextStream
	c.nextStream += 2

	c.hbuf.Reset()
	for _, f := range [...]hpack.HeaderField{
		{Name: ":method", Value: "POST"}, {Name: ":scheme", Value: "https"},
		{Name: ":path", Value: method}, {Name: ":authority", Value: c.authority},
		{Name: "content-type", Value: "application/grpc"}, {Name: "te", Value: "trailers"},
	} {
		_ = c.henc.WriteField(f)
	}
	if token != "" {
		// Indexed like any header, as grpc-go's client sends it: a proxy
		// repeats its token on its connection, and the server then reads
		// a table index instead of decoding the token again.
		_ = c.henc.WriteField(hpack.HeaderField{Name: "authorization", Value: "Bearer " + token})
	}
	if uint32(c.hbuf.Len()) > c.maxFrame {
		return status.Errorf(codes.Internal, "request headers of %d bytes exceed one frame (%d)", c.hbuf.Len(), c.maxFrame)
	}

	var err error
	c.msg = append(c.msg[:0], 0, 0, 0, 0, 0)
	if c.msg, err = (proto.MarshalOptions{}).MarshalAppend(c.msg, req); err != nil {
		return status.Errorf(codes.Internal, "marshal request: %v", err)
	}
	n := len(c.msg) - 5
	binary.BigEndian.PutUint32(c.msg[1:], uint32(n))
	if int64(len(c.msg)) > c.streamInit {
		return status.Errorf(codes.Internal, "request of %d bytes exceeds the server's stream window", len(c.msg))
	}

	// Credit the connection once a quarter of its window is used, as
	// grpc-go's client does: a WINDOW_UPDATE with every call would cost the
	// server a frame and a wake-up of its writer per call.
	if c.unacked >= creditAt {
		if err := c.fr.WriteWindowUpdate(0, c.unacked); err != nil {
			return fmt.Errorf("%w: %w", errBroken, err)
		}
		c.unacked = 0
	}
	if err := c.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: c.hbuf.Bytes(), EndHeaders: true}); err != nil {
		return fmt.Errorf("%w: %w", errBroken, err)
	}
	// The message goes out as the connection window allows; the server
	// grants more with WINDOW_UPDATE frames as it reads.
	for rest := c.msg; len(rest) > 0; {
		for c.sendWindow <= 0 {
			if err := c.flush(); err != nil {
				return err
			}
			if _, err := c.readFor(0); err != nil {
				return err
			}
		}
		chunk := min(int64(len(rest)), c.sendWindow, int64(c.maxFrame))
		if err := c.fr.WriteData(id, chunk == int64(len(rest)), rest[:chunk]); err != nil {
			return fmt.Errorf("%w: %w", errBroken, err)
		}
		c.sendWindow -= chunk
		rest = rest[chunk:]
	}
	if err := c.flush(); err != nil {
		return err
	}
	return c.response(id, resp)
}

// readFor reads and handles one frame. A frame of stream id is returned
// for the caller; connection-level frames are answered here.
func (c *h2Conn) readFor(id uint32) (http2.Frame, error) {
	f, err := c.fr.ReadFrame()
	if err != nil {
		return nil, fmt.Errorf("%w: %w", errBroken, err)
	}
	switch f := f.(type) {
	case *http2.SettingsFrame:
		if f.IsAck() {
			return nil, nil
		}
		_ = f.ForeachSetting(func(s http2.Setting) error {
			switch s.ID {
			case http2.SettingInitialWindowSize:
				c.streamInit = int64(s.Val)
			case http2.SettingMaxFrameSize:
				c.maxFrame = s.Val
			}
			return nil
		})
		if err := c.fr.WriteSettingsAck(); err != nil {
			return nil, fmt.Errorf("%w: %w", errBroken, err)
		}
		return nil, c.flush()
	case *http2.PingFrame:
		if f.IsAck() {
			return nil, nil
		}
		if err := c.fr.WritePing(true, f.Data); err != nil {
			return nil, fmt.Errorf("%w: %w", errBroken, err)
		}
		return nil, c.flush()
	case *http2.WindowUpdateFrame:
		if f.StreamID == 0 {
			c.sendWindow += int64(f.Increment)
		}
		return nil, nil
	case *http2.GoAwayFrame:
		c.done = true
		if id > f.LastStreamID {
			return nil, status.Errorf(codes.Unavailable, "server sent GOAWAY (%v) before stream %d", f.ErrCode, id)
		}
		return nil, nil
	}
	if f.Header().StreamID != id || id == 0 {
		return nil, nil // a stream we no longer wait for
	}
	return f, nil
}

func (c *h2Conn) flush() error {
	if err := c.bw.Flush(); err != nil {
		return fmt.Errorf("%w: %w", errBroken, err)
	}
	return nil
}

// response reads stream id to its end and decodes it into resp.
func (c *h2Conn) response(id uint32, resp proto.Message) error {
	c.body = c.body[:0]
	var headers, trailers *http2.MetaHeadersFrame
	var streamUnacked uint32
	for {
		f, err := c.readFor(id)
		if err != nil {
			return err
		}
		switch f := f.(type) {
		case nil:
			continue
		case *http2.DataFrame:
			c.body = append(c.body, f.Data()...)
			c.unacked += f.Length
			streamUnacked += f.Length
			if streamUnacked >= creditAt {
				// A large response: credit the stream and the connection now.
				if err := c.fr.WriteWindowUpdate(id, streamUnacked); err != nil {
					return fmt.Errorf("%w: %w", errBroken, err)
				}
				if err := c.fr.WriteWindowUpdate(0, c.unacked); err != nil {
					return fmt.Errorf("%w: %w", errBroken, err)
				}
				streamUnacked, c.unacked = 0, 0
				if err := c.flush(); err != nil {
					return err
				}
			}
			if f.StreamEnded() {
				return status.Error(codes.Internal, "the server ended the stream without trailers")
			}
		case *http2.MetaHeadersFrame:
			if headers == nil {
				headers = f
				if st := f.PseudoValue("status"); st != "200" {
					return status.Errorf(codes.Unknown, "HTTP status %q, not 200", st)
				}
			} else {
				trailers = f
			}
			if f.StreamEnded() {
				if trailers == nil {
					trailers = f // trailers-only
				}
				return c.finish(trailers, resp)
			}
		case *http2.RSTStreamFrame:
			return status.Errorf(codes.Unavailable, "the server reset the stream: %v", f.ErrCode)
		}
	}
}

// finish turns the trailers into a status and, on OK, the body into resp.
func (c *h2Conn) finish(tr *http2.MetaHeadersFrame, resp proto.Message) error {
	code, msg, details := "", "", ""
	for _, f := range tr.Fields {
		switch f.Name {
		case "grpc-status":
			code = f.Value
		case "grpc-message":
			msg = f.Value
		case "grpc-status-details-bin":
			details = f.Value
		}
	}
	if code == "" {
		return status.Error(codes.Internal, "the server sent no grpc-status")
	}
	n, err := strconv.ParseUint(code, 10, 32)
	if err != nil {
		return status.Errorf(codes.Internal, "grpc-status %q is not a number", code)
	}
	if n != 0 {
		if details != "" {
			raw, err := base64.RawStdEncoding.DecodeString(strings.TrimRight(details, "="))
			if err == nil {
				var sp spb.Status
				if proto.Unmarshal(raw, &sp) == nil {
					return status.FromProto(&sp).Err()
				}
			}
		}
		if m, err := url.PathUnescape(msg); err == nil {
			msg = m
		}
		return status.Error(codes.Code(n), msg)
	}
	if len(c.body) < 5 || c.body[0] != 0 {
		return status.Errorf(codes.Internal, "response of %d bytes is not one uncompressed gRPC message", len(c.body))
	}
	if l := binary.BigEndian.Uint32(c.body[1:5]); int(l) != len(c.body)-5 {
		return status.Errorf(codes.Internal, "response message says %d bytes, carries %d", l, len(c.body)-5)
	}
	if err := proto.Unmarshal(c.body[5:], resp); err != nil {
		return status.Errorf(codes.Internal, "unmarshal response: %v", err)
	}
	return nil
}
